"""The sandbox: statuses, limits, and hostile programs contained with no process left behind."""

import os
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

from ponderttt.eval import execution
from ponderttt.eval.execution import (
    ALLOW_ENV_VAR,
    SandboxUnavailable,
    UnsafeExecutionRefused,
    run_program,
    run_programs,
)

BEST = execution.sandbox_isolation()  # the strongest mode here; tests of no particular mode use it
needs_full = pytest.mark.skipif(BEST != "full", reason=f"isolation 'full' is not available here: {BEST!r} is")
needs_namespaces = pytest.mark.skipif(BEST == "process", reason="unshare-based isolation is not available here")
MODES = [pytest.param("full", marks=needs_full), pytest.param("namespace", marks=needs_namespaces), "process"]
NAMESPACED = [pytest.param("full", marks=needs_full), pytest.param("namespace", marks=needs_namespaces)]


@pytest.fixture(autouse=True)
def _allow(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV_VAR, "1")


def _processes_with(marker: str) -> list[int]:
    """Live processes whose command line contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if marker.encode() in cmdline:
            found.append(int(entry))
    return found


def _spawner(marker: str, n: int, then: str) -> str:
    """A program that forks ``n`` children through libc (bypassing the guard), each escaping into its own session
    and exec'ing a sleeper whose command line carries ``marker``; then runs ``then``."""
    return f"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
exe = sys.executable.encode()
for _ in range({n}):
    if libc.fork() == 0:
        libc.setsid()
        argv = (ctypes.c_char_p * 5)(exe, b"-c", b"import time; time.sleep(60)", b"{marker}", None)
        libc.execv(exe, argv)
        libc._exit(1)
print("spawned", flush=True)
{then}
"""


def test_refuses_without_consent(monkeypatch):
    monkeypatch.delenv(ALLOW_ENV_VAR)
    with pytest.raises(UnsafeExecutionRefused, match=ALLOW_ENV_VAR) as info:
        run_program("print(1)")
    assert "untrusted" in str(info.value)
    monkeypatch.setenv(ALLOW_ENV_VAR, "yes")
    with pytest.raises(UnsafeExecutionRefused, match="'yes'"):
        run_programs(["print(1)"])


@pytest.mark.parametrize("mode", MODES)
def test_statuses_and_stdin(mode):
    ok = run_program("import sys\nprint(sum(map(int, sys.stdin.read().split())))", stdin="1 2 3\n", isolation=mode)
    assert (ok.status, ok.stdout, ok.returncode, ok.isolation) == ("passed", "6\n", 0, mode)
    failed = run_program("assert 1 + 1 == 3, 'arithmetic'", isolation=mode)
    assert (failed.status, failed.returncode) == ("failed", 1)
    assert "AssertionError: arithmetic" in failed.stderr and "_sandbox_child" not in failed.stderr
    assert run_program("raise SystemExit(3)", isolation=mode).reason == "exit status 3"
    syntax = run_program("def broken(:\n    pass", isolation=mode)
    assert (syntax.status, syntax.reason) == ("error", "the source does not compile")
    assert "SyntaxError" in syntax.stderr
    main = run_program("if __name__ == '__main__':\n    print('main')", isolation=mode)
    assert main.stdout == "main\n"


@pytest.mark.parametrize("mode", MODES)
def test_infinite_loop_times_out(mode):
    r = run_program("import os\nprint(os.getcwd(), flush=True)\nwhile True:\n    pass", timeout_s=1.0, isolation=mode)
    assert (r.status, r.returncode) == ("timeout", None)
    assert r.wall_s >= 1.0
    if mode == "full":
        assert r.stdout == "/tmp\n"  # its own tmpfs, gone with its mount namespace
    else:
        assert r.stdout.startswith(os.path.join(tempfile.gettempdir(), "ponderttt-sandbox-"))
        assert not os.path.exists(r.stdout.strip())  # its private directory is gone even after a kill


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("then", ["import time\ntime.sleep(60)", "pass"])
def test_sleeping_children_are_all_killed(mode, then):
    marker = f"ponderttt-test-{uuid.uuid4().hex}"
    r = run_program(_spawner(marker, 3, then), timeout_s=1.0, isolation=mode)
    assert "spawned" in r.stdout
    # The parent either sleeps past the limit or exits at once, leaving its setsid'd children behind.
    assert r.status == ("timeout" if "sleep" in then else "passed")
    assert _processes_with(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_memory_hogs(mode):
    at_once = run_program("x = bytearray(4 * 1024**3)", memory_mb=256, isolation=mode)
    assert (at_once.status, at_once.returncode) == ("memory", 113)
    growing = run_program(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))", memory_mb=256, isolation=mode
    )
    assert growing.status == "memory"
    # A MemoryError caught by a test harness still reads as memory, from stderr.
    harness = run_program(
        "import traceback\ntry:\n    bytearray(4 * 1024**3)\nexcept MemoryError:\n    traceback.print_exc()\n"
        "    raise SystemExit(1)",
        memory_mb=256,
        isolation=mode,
    )
    assert (harness.status, harness.returncode) == ("memory", 1)
    # The limit is the address space: 100 MiB fits in 256 MiB.
    assert run_program("x = bytearray(100 << 20)\nprint(len(x))", memory_mb=256, isolation=mode).stdout == "104857600\n"


@pytest.mark.parametrize("mode", MODES)
def test_endless_output_is_capped(mode):
    r = run_program("while True:\n    print('y' * 1000)", timeout_s=2.0, max_output_bytes=50_000, isolation=mode)
    assert (r.status, r.output_truncated) == ("error", True)
    assert "output cap of 50000 bytes" in r.reason
    assert 0 < len(r.stdout) + len(r.stderr) <= 50_000
    assert set(r.stdout) <= {"y", "\n"}


@pytest.mark.parametrize("mode", MODES)
def test_file_size_limit(mode):
    r = run_program("open('big', 'wb').write(b'0' * (3 << 20))", max_file_mb=1, isolation=mode)
    assert (r.status, r.reason) == ("error", "file-size limit exceeded (EFBIG, exit status 1)")
    assert "File too large" in r.stderr
    # A non-Python descendant that does not ignore SIGXFSZ dies of it.
    r = run_program(
        "import ctypes, sys\nlibc = ctypes.CDLL(None)\nlibc.signal(25, 0)\n"  # SIGXFSZ back to SIG_DFL
        "f = open('big', 'wb')\nf.write(b'0' * (3 << 20))\nf.flush()",
        max_file_mb=1,
        isolation=mode,
    )
    assert r.status == "error" and r.reason.startswith("file-size limit exceeded")


@pytest.mark.parametrize("mode", MODES)
def test_private_directory_is_used_and_removed(mode):
    r = run_program(
        "import os\nopen('note.txt', 'w').write('hello')\nprint(open('note.txt').read())\n"
        "print(os.getcwd())\nprint(os.environ['TMPDIR'])\nprint(os.environ['HOME'])",
        isolation=mode,
    )
    hello, cwd, tmp, home = r.stdout.split()
    assert hello == "hello" and cwd == tmp == home != os.getcwd()
    if mode == "full":
        assert cwd == "/tmp"
    else:
        assert os.path.basename(cwd).startswith("ponderttt-sandbox-")
        assert not os.path.exists(cwd)


@pytest.mark.parametrize("mode", MODES)
def test_guard_blocks_deleting_files_outside(mode, tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    for attempt in (
        f"import os; os.remove({str(victim)!r})",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import subprocess; subprocess.run(['rm', '-rf', {str(tmp_path)!r}])",
        "import os; os.system('true')",
    ):
        r = run_program(attempt, isolation=mode)
        assert r.status == "failed" and "'NoneType' object is not callable" in r.stderr, attempt
    assert victim.read_text() == "keep me"


@needs_namespaces
def test_read_only_filesystem_stops_libc_deletion(tmp_path):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    r = run_program(
        "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.unlink({str(victim).encode()!r}) == -1\nprint(os.strerror(ctypes.get_errno()))\n"
        f"open({str(tmp_path / 'planted')!r}, 'w')",
        isolation="namespace",
    )
    assert r.stdout == "Read-only file system\n"
    assert r.status == "failed" and "Read-only file system" in r.stderr
    assert victim.read_text() == "keep me" and not (tmp_path / "planted").exists()


@pytest.mark.parametrize("mode", NAMESPACED)
def test_no_capabilities_left(mode):
    r = run_program(
        "print([l.split()[1] for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapBnd'))])",
        isolation=mode,
    )
    assert r.stdout == "['0000000000000000', '0000000000000000']\n"


@pytest.mark.parametrize("mode", NAMESPACED)
def test_killing_its_parent_and_everyone_harms_nobody(mode):
    marker = f"ponderttt-bystander-{uuid.uuid4().hex}"
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", marker])
    try:
        r = run_program(
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"print(os.getppid(), libc.kill({os.getpid()}, 9), libc.kill({bystander.pid}, 9), flush=True)\n"
            "libc.kill(-1, 9)\nlibc.kill(os.getppid(), 9)\nprint('still here')",
            timeout_s=2.0,
            isolation=mode,
        )
        # Its parent is outside its PID namespace (ppid 0) and no outside pid names anything it can reach:
        # kill(-1) reaches only its own namespace, kill(ppid=0) only its own process group (unshare and itself).
        assert r.stdout.split()[:3] == ["0", "-1", "-1"]
        assert (r.status, r.returncode) == ("failed", -9)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("mode", MODES)
def test_guard_blocks_os_kill(mode):
    r = run_program(f"import os; os.kill({os.getpid()}, 9)", isolation=mode)
    assert r.status == "failed" and "'NoneType' object is not callable" in r.stderr


@pytest.mark.parametrize("mode", MODES)
def test_callers_secrets_are_not_visible(mode, monkeypatch):
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("PONDERTTT_TEST_SECRET", secret)
    program = "import os\nprint(sorted(os.environ))\nprint(os.environ.get('PONDERTTT_TEST_SECRET'))\n"
    if mode != "process":
        program += f"try:\n    print(open('/proc/{os.getpid()}/environ').read())\nexcept OSError as e:\n    print(e)\n"
    r = run_program(program, isolation=mode)
    assert r.status == "passed"
    assert secret not in r.stdout and ALLOW_ENV_VAR not in r.stdout
    assert "'PATH'" in r.stdout and "None" in r.stdout
    assert os.environ["PONDERTTT_TEST_SECRET"] == secret


@pytest.mark.parametrize("mode", NAMESPACED)
def test_no_network(mode):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        r = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)", isolation=mode)
    assert r.status == "failed"
    assert "Network is unreachable" in r.stderr or "Connection refused" in r.stderr


def test_pool_runs_in_parallel_and_keeps_order():
    sources = [f"import time, sys\ntime.sleep(0.4)\nprint(sys.stdin.read() * {i})" for i in range(4)]
    sources.append("while True:\n    pass")
    results = run_programs(sources, stdins=["ab", "c", "d", "e", None], max_workers=5, timeout_s=1.5, isolation=BEST)
    assert [r.stdout for r in results[:4]] == ["\n", "c\n", "dd\n", "eee\n"]
    assert [r.status for r in results] == ["passed"] * 4 + ["timeout"]
    # Every sleeping run overlaps every other: they ran at the same time, not one after another.
    starts = [r.started_at for r in results[:4]]
    ends = [r.started_at + r.wall_s for r in results[:4]]
    assert max(starts) < min(ends)
    assert run_programs([]) == []


def test_argument_errors():
    with pytest.raises(ValueError, match="timeout_s"):
        run_program("pass", timeout_s=0)
    with pytest.raises(ValueError, match="memory_mb"):
        run_program("pass", memory_mb=8)
    with pytest.raises(ValueError, match="isolation must be one of 'full', 'namespace', 'process', got 'auto'"):
        run_program("pass", isolation="auto")
    with pytest.raises(ValueError, match="max_processes"):
        run_program("pass", max_processes=0)
    with pytest.raises(ValueError, match="disk_mb"):
        run_program("pass", disk_mb=0.5)
    with pytest.raises(ValueError, match="cpu_time_s"):
        run_program("pass", cpu_time_s=-1)
    with pytest.raises(ValueError, match="one per program"):
        run_programs(["pass"], stdins=[])


def test_import_is_light():
    code = (
        "import sys, ponderttt.eval\nbefore = set(sys.modules)\nimport ponderttt.eval.execution\n"
        "print(sorted(m for m in set(sys.modules) - before if m.split('.')[0] in ('jax', 'numpy', 'datasets')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out == "[]\n"


def test_isolation_detection_and_refusal(monkeypatch):
    monkeypatch.setattr(execution.shutil, "which", lambda name: None)
    assert execution._unshare_prefix() == []
    monkeypatch.setattr(execution.shutil, "which", lambda name: "/usr/bin/unshare")
    monkeypatch.setattr(execution.os, "geteuid", lambda: 1000)
    assert execution._unshare_prefix()[:2] == ["/usr/bin/unshare", "--map-root-user"]
    monkeypatch.setattr(execution.os, "geteuid", lambda: 0)
    assert execution._unshare_prefix() == [
        "/usr/bin/unshare",
        "--net",
        "--pid",
        "--ipc",
        "--fork",
        "--kill-child",
        "--mount-proc",
    ]
    # Where a mode is missing it is refused, naming what is missing; weaker modes run only when named.
    monkeypatch.setattr(execution, "_missing_for_full", lambda: "no usable cgroups: test")
    monkeypatch.setattr(execution, "_missing_for_namespace", lambda: "")
    assert execution.sandbox_isolation() == "namespace"
    with pytest.raises(SandboxUnavailable, match=r"isolation='full' is not available on this machine: no usable cgr"):
        run_program("print(2)")
    with pytest.raises(SandboxUnavailable, match=r"isolation='namespace' or 'process'"):
        run_programs(["print(2)"], isolation="full")
    monkeypatch.setattr(execution, "_missing_for_namespace", lambda: "it needs Linux")
    assert execution.sandbox_isolation() == "process"
    with pytest.raises(
        SandboxUnavailable, match=r"isolation='namespace' is .* it needs Linux\. .*isolation='process' "
    ):
        run_program("print(2)", isolation="namespace")
    assert isinstance(SandboxUnavailable("full", "x"), UnsafeExecutionRefused)
    r = run_program("print(2)", isolation="process")
    assert (r.stdout, r.isolation) == ("2\n", "process")


def test_cgroup_layout_from_proc_files(monkeypatch, tmp_path):
    mounts = {
        "": ("/sys/fs/cgroup/unified", "/"),
        "memory": ("/sys/fs/cgroup/memory", "/"),
        "pids": ("/sys/fs/cgroup/pids", "/"),
        "cpuacct": ("/sys/fs/cgroup/cpuacct", "/a"),
    }
    own = {"": "/", "memory": "/jobs/7", "pids": "/", "cpuacct": "/a/b"}
    assert execution._cgroup_dir(mounts, own, "memory") == "/sys/fs/cgroup/memory/jobs/7"
    assert execution._cgroup_dir(mounts, own, "cpuacct") == "/sys/fs/cgroup/cpuacct/b"
    assert execution._cgroup_dir(mounts, {"cpuacct": "/elsewhere"}, "cpuacct") is None
    assert execution._cgroup_dir(mounts, own, "cpu") is None
    # A cgroup v2 parent without the controllers is named in the reason; with them, it is the layout.
    (tmp_path / "cgroup.controllers").write_text("cpu io\n")
    monkeypatch.setenv(execution.CGROUP_ENV_VAR, str(tmp_path))
    assert execution._cgroup_v2_layout(mounts, own) == f"cgroup v2 {tmp_path} offers no memory or pids controller"
    (tmp_path / "cgroup.controllers").write_text("cpu memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("memory\n")
    assert execution._cgroup_v2_layout(mounts, own).parents == (str(tmp_path),)
    assert (tmp_path / "cgroup.subtree_control").read_text() == "+memory +pids"
    assert execution._unescape(r"/a\040b") == "/a b"


@pytest.mark.parametrize(
    ("returncode", "stderr", "cpu_s", "status"),
    [
        (0, "", 0.1, "passed"),
        (1, "AssertionError", 0.1, "failed"),
        (1, "Traceback ... MemoryError", 0.1, "memory"),
        (113, "", 0.1, "memory"),
        (114, "SyntaxError", 0.0, "error"),
        (115, "setup failed", 0.0, "error"),
        (-24, "", 4.0, "timeout"),  # SIGXCPU at the soft CPU limit
        (-9, "", 4.0, "timeout"),  # SIGKILL at the hard CPU limit (a namespace init ignores SIGXCPU)
        (-9, "", 0.2, "failed"),  # SIGKILL well below the CPU limit: not a CPU timeout
        (-25, "", 0.1, "error"),  # SIGXFSZ
        (-11, "", 0.1, "failed"),
        (-40, "", 0.1, "failed"),  # a real-time signal
        (-6, "MemoryError", 0.1, "memory"),
        (1, "OSError: [Errno 27] File too large", 0.1, "error"),
    ],
)
def test_classify(returncode, stderr, cpu_s, status):
    assert execution._classify(returncode, stderr, cpu_s, 4.0)[0] == status


def test_classify_total_memory_cap():
    # The cgroup's OOM killer ended a process: the program died of it, or failed because a child did.
    for returncode in (-9, 1):
        status, reason = execution._classify(returncode, "", 0.2, 4.0, oom_kills=2)
        assert (status, reason) == ("memory", "total memory cap reached: the OOM killer ended 2 of its processes")
    assert execution._classify(0, "", 0.2, 4.0, oom_kills=2)[0] == "passed"  # it coped: its verdict stands


def test_cpu_time_is_reported():
    r = run_program("print(sum(i * i for i in range(3_000_000)))", timeout_s=20.0, isolation=BEST)
    assert r.status == "passed" and 0.02 < r.cpu_s
