"""The process inside the sandbox: lock itself down, then run the untrusted program.

Started by ``ponderttt.eval.execution`` as ``python -I -B _sandbox_child.py '<json config>'`` (possibly under
``unshare``). It imports only the standard library and never the package it lives in, so it runs from its file path
in a fresh interpreter. :func:`set_up` does every step before the program's code is compiled, in an order that
matters: join the run's cgroups first (before anything can fork, so every descendant is inside), read the source
while the host filesystem is still there, build the filesystem (a new root, or the host's made read-only: this needs
capabilities), drop the capabilities, then the rlimits; the reliability guard comes just before the program runs.

With ``"filesystem": "new-root"`` (isolation "full") the program's root is a small read-only tmpfs holding
read-only bind mounts of the interpreter's directories (``binds``), a minimal ``/dev``, a fresh ``/proc`` of its PID
namespace and a size-capped tmpfs at ``/tmp``, the only writable place: ``/tmp/program.py`` is the program, ``/tmp``
its working directory, ``HOME`` and ``TMPDIR``. The host's root is detached (``pivot_root``), so no other host file
or Unix socket exists for it.

Exit codes 113-115 are reserved to tell the parent what happened (a program that exits with one of them on purpose
is misreported; nothing else depends on it).
"""

import builtins
import ctypes
import fcntl
import json
import os
import resource
import signal
import sys
import traceback

EXIT_MEMORY = 113  # the program raised MemoryError (address-space limit reached)
EXIT_COMPILE = 114  # the source does not compile
EXIT_SETUP = 115  # the sandbox could not be set up: the program never ran

_PR_SET_PDEATHSIG = 1
_PR_CAPBSET_DROP = 24
_PR_SET_NO_NEW_PRIVS = 38
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MNT_DETACH = 0x2
_AT_FDCWD = -100
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 0x1
_MOUNT_ATTR_NOSUID = 0x2
_SYS_MOUNT_SETATTR = 442  # same number on every Linux architecture (new-style syscall table)
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}
# The devices a program may use: bind-mounted from the host one by one (never the host's /dev itself).
_DEVICES = ("null", "zero", "full", "random", "urandom")
_DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "shm": "/tmp",
}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(result, what):
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def join_cgroups(procs_files):
    """Move this process into the run's cgroups (one ``cgroup.procs`` per hierarchy): its descendants are born there."""
    for path in procs_files:
        with open(path, "w") as f:
            f.write("0")


def _mount(libc, source, target, fstype=None, flags=0, data=None):
    libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
    args = [None if text is None else text.encode() for text in (source, target, fstype, data)]
    _check(libc.mount(*args[:3], flags, args[3]), f"mount {target}")


def _set_mount_attr(libc, path, attr_set, attr_clr, flags):
    libc.syscall.restype = ctypes.c_long
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    _check(
        libc.syscall(_SYS_MOUNT_SETATTR, _AT_FDCWD, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr)),
        f"mount_setattr {path}",
    )


def lock_filesystem(libc, workdir):
    """Make every mount read-only except the private working directory (needs a private mount namespace)."""
    _mount(libc, workdir, workdir, flags=_MS_BIND)
    _set_mount_attr(libc, "/", _MOUNT_ATTR_RDONLY, 0, _AT_RECURSIVE)
    _set_mount_attr(libc, workdir, 0, _MOUNT_ATTR_RDONLY, 0)


def _replicate(libc, path, root):
    """Make host ``path`` appear at the same path under ``root``: a symlink as a symlink, else a bind mount."""
    target = root + path
    os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
    if os.path.islink(path):
        os.symlink(os.readlink(path), target)
    elif os.path.isdir(path):
        os.mkdir(target, 0o755)
        _mount(libc, path, target, flags=_MS_BIND | _MS_REC)
    else:
        open(target, "w").close()
        _mount(libc, path, target, flags=_MS_BIND)


def enter_new_root(libc, config, source):
    """Build the program's root on a tmpfs at ``config["root"]``, write the program into its ``/tmp``, pivot into it
    and detach the host's root; everything ends read-only except ``/tmp`` (needs private mount and PID namespaces)."""
    root = config["root"]
    _mount(libc, "tmpfs", root, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,nr_inodes=4096,mode=755")
    for path in config["binds"]:
        _replicate(libc, path, root)
    for name in _DEVICES:
        _replicate(libc, f"/dev/{name}", root)
    for name, target in _DEV_LINKS.items():
        os.symlink(target, f"{root}/dev/{name}")
    os.mkdir(root + "/proc", 0o555)
    _mount(libc, "proc", root + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
    os.mkdir(root + "/tmp", 0o700)
    _mount(
        libc,
        "tmpfs",
        root + "/tmp",
        "tmpfs",
        _MS_NOSUID | _MS_NODEV,
        f"size={config['tmp_bytes']},nr_inodes={config['tmp_inodes']},mode=700",
    )
    with open(root + config["program"], "w", encoding="utf-8") as f:
        f.write(source)

    pivot_root = _SYS_PIVOT_ROOT.get(os.uname().machine)
    if pivot_root is None:
        raise OSError(f"pivot_root: syscall number unknown on {os.uname().machine}")
    os.chdir(root)
    libc.syscall.restype = ctypes.c_long
    _check(libc.syscall(pivot_root, b".", b"."), "pivot_root")  # the host's root is now stacked on top of "/"
    _check(libc.umount2(b".", _MNT_DETACH), "detach the host's root")
    os.chdir("/")
    _set_mount_attr(libc, "/", _MOUNT_ATTR_RDONLY | _MOUNT_ATTR_NOSUID, 0, _AT_RECURSIVE)
    _set_mount_attr(libc, "/tmp", 0, _MOUNT_ATTR_RDONLY, 0)


def detach_stdin():
    """Replace standard input (a host file) by a sealed in-memory copy: through ``/proc/self/fd/0`` a host file could
    be reopened for writing, outside every mount this process made read-only."""
    with open(0, "rb", closefd=False) as host_file:
        data = host_file.read()
    fd = os.memfd_create("stdin", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    with open(fd, "wb", closefd=False) as copy:
        copy.write(data)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
    os.lseek(fd, 0, os.SEEK_SET)
    os.dup2(fd, 0)  # the duplicate has no close-on-exec flag
    os.close(fd)


def drop_capabilities(libc):
    """Root keeps its uid but loses every capability, now and across exec (bounding set emptied, no_new_privs)."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _check(libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} from the bounding set")
    _check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "set no_new_privs")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset to empty")


def set_limits(memory_bytes, cpu_s, file_bytes, open_files):
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes, file_bytes))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))
    # SIGXCPU at the soft limit, SIGKILL one second later should the program catch SIGXCPU.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))


# Functions that delete, move, re-own or re-permission files, signal or spawn processes, or change identity.
_OS_DISABLED = (
    "kill killpg system popen putenv unsetenv remove removedirs rmdir unlink rename renames replace truncate "
    "chmod fchmod lchmod chown fchown lchown lchflags chflags chroot fchdir setuid seteuid setreuid setresuid "
    "setgid setegid setregid setresgid setsid setpgid fork forkpty execl execle execlp execlpe execv execve execvp "
    "execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn posix_spawnp mknod"
).split()
_SHUTIL_DISABLED = ("rmtree", "move", "chown")
_SUBPROCESS_DISABLED = ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput")
_MODULES_BLOCKED = ("ipdb", "joblib", "resource", "psutil", "tkinter")


def apply_reliability_guard():
    """Disable the destructive standard-library entry points (the same idea as human-eval's reliability guard).

    This stops accidents, not attackers (``ctypes`` reaches libc directly); the namespaces, the read-only
    filesystem, the dropped capabilities and the rlimits are what contain a hostile program.
    """
    import posix
    import shutil
    import subprocess

    for module in (os, posix):
        for name in _OS_DISABLED:
            if hasattr(module, name):
                setattr(module, name, None)
    for name in _SHUTIL_DISABLED:
        setattr(shutil, name, None)
    for name in _SUBPROCESS_DISABLED:
        setattr(subprocess, name, None)
    for name in _MODULES_BLOCKED:
        sys.modules[name] = None
    builtins.help = None


def set_up(config):
    """Every step before the program's code is compiled; returns its source. Afterwards the process is in its
    cgroups, inside its filesystem with ``config["workdir"]`` as working directory, without capabilities, under
    its rlimits; the program file is ``config["program"]``."""
    join_cgroups(config["cgroup_procs"])
    libc = ctypes.CDLL(None, use_errno=True)
    # Die with the parent (unshare or the caller), whatever happens to the process group.
    _check(libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "set the parent-death signal")
    with open(config["source"], encoding="utf-8") as f:
        source = f.read()
    if config["filesystem"] == "new-root":
        detach_stdin()
        enter_new_root(libc, config, source)
    elif config["filesystem"] == "read-only":
        lock_filesystem(libc, config["workdir"])
    if os.geteuid() == 0:
        drop_capabilities(libc)
    os.chdir(config["workdir"])
    set_limits(config["memory_bytes"], config["cpu_s"], config["file_bytes"], config["open_files"])
    return source


def run_untrusted(code, config):
    """Run the compiled program as ``__main__`` behind the reliability guard; return its globals if its top level
    finishes. A MemoryError exits with EXIT_MEMORY, any other uncaught exception with status 1 after its traceback
    (the program's frames only); SystemExit propagates (the interpreter exits with its status)."""
    if config["reliability_guard"]:
        apply_reliability_guard()
    sys.argv = [config["program"]]
    program_globals = {"__name__": "__main__", "__file__": config["program"], "__builtins__": builtins}
    try:
        exec(code, program_globals)
    except MemoryError:
        print("MemoryError: the program exceeded its address-space limit", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_MEMORY)
    except SystemExit:
        raise
    except BaseException as exc:
        # Show the program's frames only, not this wrapper's.
        traceback.print_exception(exc.with_traceback(exc.__traceback__.tb_next))
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    return program_globals


def load_harness():
    """The grading harness (``_harness.py`` next to this file), loaded by path while the host filesystem is there."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_harness.py")
    spec = importlib.util.spec_from_file_location("_ponderttt_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    config = json.loads(sys.argv[1])
    try:
        harness = load_harness() if config.get("graded") else None
        source = set_up(config)
    except Exception as exc:  # the program must not run in a half-built sandbox
        print(f"ponderttt sandbox: setup failed: {exc!r}", file=sys.stderr, flush=True)
        os._exit(EXIT_SETUP)

    try:
        code = compile(source, config["program"], "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        sys.stderr.flush()
        os._exit(EXIT_COMPILE)
    except MemoryError:
        os._exit(EXIT_MEMORY)
    del source

    if harness is not None:  # the tests run here, the program in a forked worker (see _harness.py); never returns
        harness.run_graded(code, config["graded"], lambda program: run_untrusted(program, config))
    run_untrusted(code, config)


if __name__ == "__main__":
    main()
