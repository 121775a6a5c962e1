"""Hostile programs against isolation "full": each runs only inside that sandbox, with small caps.

Where "full" cannot be had on this machine its tests are skipped with the reason, and the one test that runs
instead asserts that ``run_program`` refuses untrusted code by default there.
"""

import os
import pathlib
import socket
import sys
import tempfile
import uuid

import pytest

from ponderttt.eval import execution
from ponderttt.eval.execution import ALLOW_ENV_VAR, SandboxUnavailable, run_program

MISSING = execution._missing_for_full()
needs_full = pytest.mark.skipif(bool(MISSING), reason=f"isolation 'full' is not available here: {MISSING}")
REPOSITORY = pathlib.Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _allow(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")


def run(source: str, **caps) -> execution.ExecutionResult:
    """``source`` under isolation "full" with small caps (each test may lower or raise one)."""
    limits = {"timeout_s": 5.0, "memory_mb": 256, "max_processes": 8, "disk_mb": 4, **caps}
    result = run_program(source, isolation="full", **limits)
    assert result.isolation == "full"
    return result


def _processes_named(marker: str) -> list[int]:
    """Live processes whose name (comm) or command line contains ``marker``."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/comm", "rb") as f, open(f"/proc/{entry}/cmdline", "rb") as g:
                text = f.read() + g.read()
        except OSError:
            continue
        found += [int(entry)] if marker.encode() in text else []
    return found


def _our_cgroups() -> list[str]:
    layout = execution._cgroups()
    prefix = f"ponderttt-{os.getpid()}-"
    return [os.path.join(p, n) for p in layout.parents for n in os.listdir(p) if n.startswith(prefix)]


@pytest.mark.skipif(not MISSING, reason="isolation 'full' is available here: its hostile tests run instead")
def test_refuses_by_default_where_full_is_unavailable():
    with pytest.raises(SandboxUnavailable, match="isolation='full' is not available") as info:
        run_program("print(1)")
    assert f"{MISSING}. To run untrusted code with weaker isolation" in str(info.value)
    assert "ask for it explicitly: isolation='namespace' or 'process'" in str(info.value)


@needs_full
def test_fork_bomb_stays_under_the_process_cap_and_leaves_nothing():
    marker = f"pt{uuid.uuid4().hex[:13]}"  # a process name (comm) holds 15 characters
    r = run(
        f"""
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
libc.prctl(15, {marker.encode()!r}, 0, 0, 0)  # PR_SET_NAME, inherited by every fork
refused = 0
for _ in range(64):  # every child goes on forking too
    if libc.fork() == -1:
        refused += 1
if os.getpid() == 1:
    time.sleep(0.3)
    print(len([p for p in os.listdir('/proc') if p.isdigit()]), refused > 0)
else:
    time.sleep(60)
""",
        max_processes=8,
    )
    assert r.status == "passed", r.stderr
    alive, refused = r.stdout.split()
    assert 2 <= int(alive) <= 8 and refused == "True"
    assert _processes_named(marker) == []
    assert _our_cgroups() == []


_CHILDREN_ALLOCATE = """
import ctypes, time
libc = ctypes.CDLL(None, use_errno=True)
children = []
for _ in range({n}):
    pid = libc.fork()
    if pid == 0:
        block = bytearray(60 << 20)  # zero-filled: every page is touched
        time.sleep(0.5)
        libc._exit(0)
    children.append(pid)
status = ctypes.c_int()
failed = 0
for pid in children:
    libc.waitpid(pid, ctypes.byref(status), 0)
    failed += status.value != 0
print(failed)
raise SystemExit(1 if failed else 0)
"""


@needs_full
def test_memory_cap_is_for_all_processes_together():
    one = run(_CHILDREN_ALLOCATE.format(n=1), memory_mb=128)
    assert (one.status, one.stdout) == ("passed", "0\n")
    four = run(_CHILDREN_ALLOCATE.format(n=4), memory_mb=128)  # 60 MiB each fits one process's rlimit, not 4 x 60
    assert four.status == "memory"
    assert four.reason.startswith("total memory cap reached: the OOM killer ended")


@needs_full
def test_cpu_cap_is_for_all_processes_together():
    r = run(
        "import ctypes\nlibc = ctypes.CDLL(None)\nfor _ in range(3):\n    if libc.fork() == 0:\n        break\n"
        "while True:\n    pass",
        timeout_s=20.0,
        cpu_time_s=1.0,
    )
    assert (r.status, r.returncode) == ("timeout", None)
    assert r.reason == "CPU-time cap of 1 s (all its processes) reached"
    assert 1.0 < r.cpu_s < 2.5 and r.wall_s < 15.0


@needs_full
def test_host_unix_sockets_and_files_are_not_there(tmp_path):
    path = str(tmp_path / "host.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        r = run(
            f"""
import os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect({path!r})
    print("connected")
except OSError as error:
    print(type(error).__name__)
print(os.listdir("/tmp"), os.path.exists("/run"), os.path.exists("/var"))
""",
        )
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody knocked
    assert r.stdout == "FileNotFoundError\n['program.py'] False False\n"


@needs_full
def test_stdin_is_no_door_to_a_host_file():
    r = run(
        "import os, sys\nprint(sys.stdin.read())\nprint(os.readlink('/proc/self/fd/0'))\n"
        "try:\n    open('/proc/self/fd/0', 'w')\nexcept OSError as error:\n    print(error.strerror)",
        stdin="question",
    )
    assert r.stdout == "question\n/memfd:stdin (deleted)\nOperation not permitted\n"  # a sealed in-memory copy


@needs_full
def test_secrets_repository_and_home_are_not_visible():
    home = pathlib.Path.home()
    prefix = pathlib.Path(sys.base_prefix).resolve()
    # The base interpreter's prefix may lie in the home directory: then only the path down to it is there.
    expected_home = sorted({prefix.relative_to(home).parts[0]}) if prefix.is_relative_to(home) else []
    r = run(
        f"""
import os
print(os.path.exists("/etc/shadow"), os.path.exists("/etc/passwd"), os.path.exists({str(REPOSITORY)!r}))
print(sorted(os.listdir({str(home)!r})) if os.path.isdir({str(home)!r}) else [])
"""
    )
    assert r.stdout == f"False False False\n{expected_home}\n"
    assert (REPOSITORY / "pyproject.toml").exists()  # the path the program looked for is the real one


@needs_full
def test_nothing_but_tmp_is_writable():
    r = run(
        f"""
import ctypes, os
for path in ["/new", "/usr/new", "/etc/new", "/dev/new", "/proc/sys/kernel/hostname", {sys.base_prefix + "/new"!r}]:
    try:
        open(path, "w").close()
        print("wrote", path)
    except OSError as error:
        print(error.strerror)
libc = ctypes.CDLL(None, use_errno=True)
print(libc.mount(None, b"/", None, 0x1020, None), os.strerror(ctypes.get_errno()))  # MS_REMOUNT | MS_BIND: rw
open("/tmp/ok", "w").write("fine")
print(open("/tmp/ok").read())
"""
    )
    lines = r.stdout.splitlines()
    assert lines[:6] == ["Read-only file system"] * 6
    assert lines[6:] == ["-1 Operation not permitted", "fine"]


@needs_full
def test_disk_cap_holds_for_many_small_files_and_many_empty_ones():
    marker = f"ponderttt-fill-{uuid.uuid4().hex}"
    r = run(
        f"""
import errno
written = 0
try:
    for i in range(1000):
        with open(f"/tmp/{marker}-{{i}}", "wb") as f:
            f.write(b"x" * (64 << 10))
        written += 64 << 10
except OSError as error:
    print(written >> 10, errno.errorcode[error.errno])
files = 0
try:
    for i in range(10_000):
        open(f"/tmp/empty-{{i}}", "w").close()
        files += 1
except OSError as error:
    print(files, errno.errorcode[error.errno])
""",
        disk_mb=4,
    )
    (kib, full), (files, no_inode) = (line.split() for line in r.stdout.splitlines())
    assert (full, no_inode) == ("ENOSPC", "ENOSPC")
    assert 3 * 1024 <= int(kib) <= 4 * 1024  # the tmpfs is 4 MiB; nothing went to the host
    assert 100 <= int(files) < 4 * 64  # 64 inodes per MiB of disk_mb
    assert not [name for name in os.listdir(tempfile.gettempdir()) if name.startswith(marker)]


@needs_full
def test_no_network_of_any_kind():
    abstract = f"\0ponderttt-{uuid.uuid4().hex}"
    with (
        socket.create_server(("127.0.0.1", 0)) as tcp,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
    ):
        udp.bind(("127.0.0.1", 0))
        unix.bind(abstract)
        unix.listen()
        r = run(
            f"""
import socket
from socket import AF_INET, AF_UNIX, SOCK_DGRAM, SOCK_STREAM
attempts = [
    ("tcp", lambda: socket.create_connection(("127.0.0.1", {tcp.getsockname()[1]}), timeout=1)),
    ("udp", lambda: socket.socket(AF_INET, SOCK_DGRAM).sendto(b"hi", ("127.0.0.1", {udp.getsockname()[1]}))),
    ("unix", lambda: socket.socket(AF_UNIX, SOCK_STREAM).connect({abstract!r})),
    ("dns", lambda: socket.create_connection(("example.com", 80), timeout=1)),
]
for name, attempt in attempts:
    try:
        attempt()
        print(name, "reached")
    except OSError as error:
        print(name, type(error).__name__)
"""
        )
        for server in (tcp, udp, unix):
            server.setblocking(False)
        with pytest.raises(BlockingIOError):
            tcp.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
        with pytest.raises(BlockingIOError):
            unix.accept()
    outcomes = dict(line.split() for line in r.stdout.splitlines())
    assert set(outcomes) == {"tcp", "udp", "unix", "dns"} and "reached" not in outcomes.values()
    assert outcomes["unix"] == "ConnectionRefusedError"  # abstract names are per network namespace


@needs_full
def test_a_daemon_without_the_token_is_gone_when_it_returns():
    marker = f"ponderttt-daemon-{uuid.uuid4().hex}"
    r = run(
        f"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.fork() == 0:
    libc.setsid()
    if libc.fork() == 0:  # the classic double fork, then an empty environment: the token sweep cannot see it
        exe = sys.executable.encode()
        argv = (ctypes.c_char_p * 5)(exe, b"-c", b"import time; time.sleep(60)", {marker.encode()!r}, None)
        libc.execve(exe, argv, (ctypes.c_char_p * 1)(None))
    libc._exit(0)
import time
time.sleep(0.3)
print("left a daemon")
"""
    )
    assert (r.status, r.stdout) == ("passed", "left a daemon\n")
    assert _processes_named(marker) == []


@needs_full
def test_no_sysv_ipc_outlives_it():
    key = int(uuid.uuid4().int % (1 << 30)) + 1
    r = run(
        f"import ctypes\nlibc = ctypes.CDLL(None)\nprint(libc.shmget({key}, 1 << 20, 0o1600) >= 0)"  # IPC_CREAT
    )
    assert r.stdout == "True\n"
    with open("/proc/sysvipc/shm") as f:
        keys = {int(line.split()[0]) for line in f.readlines()[1:]}
    assert key not in keys


@needs_full
def test_every_process_is_in_the_runs_cgroup_and_the_cgroup_is_removed():
    r = run("print(open('/proc/self/cgroup').read())")
    lines = [line for line in r.stdout.splitlines() if f"ponderttt-{os.getpid()}-" in line]
    layout = execution._cgroups()
    assert len(lines) == (1 if layout.version == 2 else 3)  # v1: memory, pids, cpuacct
    run("while True:\n    pass", timeout_s=0.5)  # killed by the sandbox
    assert _our_cgroups() == []


@needs_full
def test_cgroups_of_dead_callers_are_swept():
    layout = execution._cgroups()
    gone = os.fork()
    if gone == 0:
        os._exit(0)
    os.waitpid(gone, 0)  # a pid that no longer runs
    name = f"ponderttt-{gone}-{uuid.uuid4().hex}"
    for parent in layout.parents:
        os.mkdir(os.path.join(parent, name))
    execution._sweep_stale_cgroups(layout)
    assert [p for p in layout.parents if os.path.exists(os.path.join(p, name))] == []
