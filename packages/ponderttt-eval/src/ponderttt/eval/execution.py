"""Sandboxed execution of untrusted (model-generated) Python programs.

``run_program(source, timeout_s=3.0, memory_mb=1024)`` runs ``source`` as ``__main__`` in a fresh interpreter and
returns an :class:`ExecutionResult` whose ``status`` is one of

=========  ==========================================================================================
passed     the program exited with status 0
failed     it ran and failed: non-zero exit, uncaught exception, killed by a signal of its own making
timeout    wall clock over ``timeout_s`` (or its CPU-time rlimit, SIGXCPU)
memory     it hit the address-space rlimit (MemoryError, or a crash with MemoryError on stderr)
error      it could not be judged: the source does not compile, the sandbox could not be set up, or it
           broke the output cap or the file-size rlimit
=========  ==========================================================================================

How a program is contained (the parent keeps track of it; the child ``_sandbox_child.py`` locks itself down):

- a **fresh process**: the interpreter is started by ``subprocess`` (fork+exec with no Python code run in between,
  no ``preexec_fn``: the same spawn mechanism as multiprocessing's ``"spawn"`` context), so the caller (a JAX
  process with threads) is never forked into a Python child; ``python -I -B`` ignores the caller's ``PYTHON*``
  variables, user site-packages and working directory;
- **namespaces** where the OS allows (detected at run time, once): ``unshare --net --pid --fork --kill-child
  --mount-proc`` (with ``--map-root-user`` when not root): no network, its own PID space (it sees and can signal
  only its own processes; all of them die when its first process dies), a private mount table in which every mount
  is made read-only except the program's temporary directory;
- as root, **every capability dropped** (bounding set emptied, ``no_new_privs``) so the program can neither undo
  the read-only mounts nor raise its rlimits;
- **rlimits** on address space (``memory_mb``), CPU time, file size, open files, and no core dumps;
- its own **process group / session**, killed with all descendants on timeout and after every run; a last sweep
  kills any process still carrying this run's token in its environment (catches ``setsid`` escapes when no PID
  namespace is available);
- a **private temporary directory** as working directory, ``HOME`` and ``TMPDIR``, removed afterwards;
- a **stripped environment** (none of the caller's variables: only ``PATH``, locale, thread caps and the token);
- human-eval's idea of a **reliability guard** (``os.kill``, ``os.remove``, ``shutil.rmtree``, ``subprocess.Popen``,
  ``os.fork`` ... set to ``None``), which stops accidents, not attackers;
- stdout and stderr **captured with a size cap** (``max_output_bytes``): beyond it the program is killed.

Without namespaces (``isolation="process"``) a program running as root can still reach the caller through ``ctypes``
(signal it, read ``/proc/<pid>/environ``, delete the caller's files): use the namespace mode for hostile code.

Execution refuses to start unless the environment variable ``PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1`` is set.
``run_programs`` runs many programs in parallel in a pool of worker threads, each waiting on its own sandbox.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
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

__all__ = [
    "ALLOW_ENV_VAR",
    "STATUSES",
    "ExecutionResult",
    "UnsafeExecutionRefused",
    "run_program",
    "run_programs",
    "sandbox_isolation",
]

ALLOW_ENV_VAR = "PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS"
STATUSES = ("passed", "failed", "timeout", "memory", "error")
Isolation = Literal["auto", "namespace", "process"]

_CHILD_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
# Mirrors _sandbox_child.EXIT_* (that module is a script run by path, not imported here).
_EXIT_MEMORY, _EXIT_COMPILE, _EXIT_SETUP = 113, 114, 115
_TOKEN_VAR = "PONDERTTT_SANDBOX_TOKEN"
_UNSHARE_FLAGS = ("--net", "--pid", "--fork", "--kill-child", "--mount-proc")
_READ_CHUNK = 65536


class UnsafeExecutionRefused(PermissionError):
    """Raised when untrusted code would run without the user's explicit consent."""


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """What one sandboxed run did.

    ``status`` is one of :data:`STATUSES`; ``reason`` says why in words; ``returncode`` is the process's (negative:
    killed by that signal; ``None``: killed by the sandbox); ``stdout``/``stderr`` are decoded (UTF-8, replacing
    bad bytes) and cut at the output cap (``output_truncated``); ``started_at`` is ``time.monotonic()`` at launch;
    ``wall_s`` the wall-clock duration; ``cpu_s`` the CPU time (user + system) of the program and the descendants
    it waited for; ``isolation`` the mode used (``"namespace"`` or ``"process"``).
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

    @property
    def passed(self) -> bool:
        """True when ``status == "passed"`` (exit status 0 within the limits)."""
        return self.status == "passed"


def _require_consent() -> None:
    if os.environ.get(ALLOW_ENV_VAR) != "1":
        raise UnsafeExecutionRefused(
            "Refusing to execute untrusted code: run_program runs model-generated programs, which can be "
            "malicious or simply destructive. The sandbox (namespaces, read-only filesystem, rlimits, stripped "
            "environment) lowers the risk but is not a security boundary like a VM. Run benchmarks that execute "
            f"code in a disposable machine or container, and set {ALLOW_ENV_VAR}=1 to acknowledge this "
            f"(it is currently {os.environ.get(ALLOW_ENV_VAR)!r})."
        )


def _unshare_prefix() -> list[str]:
    unshare = shutil.which("unshare")
    if unshare is None or not sys.platform.startswith("linux"):
        return []
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return [unshare, *user, *_UNSHARE_FLAGS]


@functools.lru_cache(maxsize=1)
def _namespace_prefix() -> tuple[str, ...]:
    """The ``unshare`` command prefix if a full namespace sandbox starts and runs a program here, else ``()``."""
    prefix = _unshare_prefix()
    if not prefix:
        return ()
    result = _execute("print(6 * 7)", prefix=tuple(prefix), lock_filesystem=True, timeout_s=20.0, memory_mb=512)
    return tuple(prefix) if result.status == "passed" and result.stdout.strip() == "42" else ()


def sandbox_isolation() -> str:
    """``"namespace"`` when unshare-based isolation works on this machine (probed once), else ``"process"``."""
    return "namespace" if _namespace_prefix() else "process"


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


def _classify(returncode: int, stderr: str, cpu_s: float = 0.0, cpu_limit_s: float = math.inf) -> tuple[str, str]:
    """(status, reason) of a program that ended on its own (not killed by the sandbox's wall clock or output cap)."""
    if returncode == 0:
        return "passed", "exit status 0"
    if returncode == _EXIT_MEMORY:
        return "memory", "MemoryError: address-space limit reached"
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
    prefix: tuple[str, ...],
    lock_filesystem: bool,
    timeout_s: float,
    memory_mb: int,
    stdin: str | None = None,
    max_output_bytes: int = 1 << 20,
    max_file_mb: int = 16,
    max_open_files: int = 128,
    reliability_guard: bool = True,
) -> ExecutionResult:
    isolation = "namespace" if prefix else "process"
    token = uuid.uuid4().hex
    workdir = tempfile.mkdtemp(prefix="ponderttt-sandbox-")
    program = os.path.join(workdir, "program.py")
    with open(program, "w", encoding="utf-8") as f:
        f.write(source)
    stdin_path = os.path.join(workdir, ".stdin")
    with open(stdin_path, "w", encoding="utf-8") as f:
        f.write(stdin or "")
    config = {
        "workdir": workdir,
        "program": program,
        "lock_filesystem": lock_filesystem,
        "memory_bytes": int(memory_mb) << 20,
        "cpu_s": math.ceil(timeout_s) + 1,
        "file_bytes": int(max_file_mb) << 20,
        "open_files": int(max_open_files),
        "reliability_guard": reliability_guard,
    }
    command = [*prefix, sys.executable, "-I", "-B", _CHILD_SCRIPT, json.dumps(config)]
    buffers = {"stdout": bytearray(), "stderr": bytearray()}
    total = 0
    killed_for: tuple[str, str] | None = None
    started = time.monotonic()
    deadline = started + timeout_s
    try:
        with open(stdin_path, "rb") as stdin_file:
            proc = subprocess.Popen(
                command,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=_child_env(workdir, token),
                start_new_session=True,
                close_fds=True,
            )
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ, "stdout")
                selector.register(proc.stderr, selectors.EVENT_READ, "stderr")
                leader_done = False
                give_up_at = math.inf  # once everything is killed, EOF should follow at once; never hang on it
                while selector.get_map():
                    now = time.monotonic()
                    if not leader_done and _exited(proc):
                        # Descendants may still hold the pipes open: kill them so the pipes reach EOF.
                        leader_done = True
                        _kill_group(proc)
                        _sweep(token)
                        give_up_at = min(give_up_at, now + 5.0)
                    elif not leader_done and killed_for is None and now >= deadline:
                        killed_for = ("timeout", f"wall-clock limit of {timeout_s:g} s reached")
                        _kill_group(proc)
                        _sweep(token)
                        give_up_at = min(give_up_at, now + 5.0)
                    if now > give_up_at:
                        break
                    wait = 0.05 if killed_for or leader_done else max(0.0, min(0.05, deadline - now))
                    for key, _ in selector.select(timeout=wait):
                        data = os.read(key.fileobj.fileno(), _READ_CHUNK)
                        if not data:
                            selector.unregister(key.fileobj)
                            continue
                        room = max(0, max_output_bytes - total)
                        buffers[key.data] += data[:room]
                        total += len(data)
                        if total > max_output_bytes and killed_for is None:
                            killed_for = ("error", f"output cap of {max_output_bytes} bytes exceeded")
                            _kill_group(proc)
                            _sweep(token)
                            give_up_at = min(give_up_at, time.monotonic() + 5.0)
        finally:
            _kill_group(proc)
            _, wait_status, usage = os.wait4(proc.pid, 0)
            proc.returncode = returncode = os.waitstatus_to_exitcode(wait_status)
            cpu_used = usage.ru_utime + usage.ru_stime
            _sweep(token)
            proc.stdout.close()
            proc.stderr.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    wall_s = time.monotonic() - started
    stdout = buffers["stdout"].decode("utf-8", errors="replace")
    stderr = buffers["stderr"].decode("utf-8", errors="replace")
    if killed_for is not None:
        status, reason = killed_for
        returncode_out = None
    else:
        status, reason = _classify(returncode, stderr, cpu_used, config["cpu_s"])
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
    )


def _check_limits(timeout_s: float, memory_mb: int, max_output_bytes: int, isolation: str) -> None:
    if not (isinstance(timeout_s, int | float) and 0 < timeout_s < math.inf):
        raise ValueError(f"timeout_s must be a positive finite number of seconds, got {timeout_s!r}")
    if not (isinstance(memory_mb, int) and memory_mb >= 64):
        raise ValueError(f"memory_mb must be an int >= 64 (the interpreter alone needs ~30 MiB), got {memory_mb!r}")
    if not (isinstance(max_output_bytes, int) and max_output_bytes > 0):
        raise ValueError(f"max_output_bytes must be a positive int, got {max_output_bytes!r}")
    if isolation not in ("auto", "namespace", "process"):
        raise ValueError(f"isolation must be 'auto', 'namespace' or 'process', got {isolation!r}")


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
    isolation: Isolation = "auto",
) -> ExecutionResult:
    """Run untrusted Python ``source`` in the sandbox and report what happened (see the module docstring).

    ``stdin`` is fed to the program's standard input; ``isolation="auto"`` uses namespaces when available,
    ``"namespace"`` insists on them (``RuntimeError`` if unavailable), ``"process"`` uses process groups and rlimits
    only. Raises :class:`UnsafeExecutionRefused` unless ``PONDER_TTT_ALLOW_UNSAFE_BENCHMARKS=1``.
    """
    _require_consent()
    _check_limits(timeout_s, memory_mb, max_output_bytes, isolation)
    prefix: tuple[str, ...] = ()
    if isolation != "process":
        prefix = _namespace_prefix()
        if not prefix and isolation == "namespace":
            raise RuntimeError(
                "isolation='namespace' was requested but `unshare --net --pid --fork --kill-child --mount-proc` "
                "does not work here (needs Linux, util-linux unshare, and root or unprivileged user namespaces); "
                "use isolation='auto' or 'process'."
            )
    return _execute(
        source,
        prefix=prefix,
        lock_filesystem=bool(prefix),
        timeout_s=float(timeout_s),
        memory_mb=memory_mb,
        stdin=stdin,
        max_output_bytes=max_output_bytes,
        max_file_mb=max_file_mb,
        max_open_files=max_open_files,
        reliability_guard=reliability_guard,
    )


def run_programs(
    sources: Sequence[str],
    *,
    stdins: Sequence[str | None] | None = None,
    max_workers: int | None = None,
    **kwargs: Any,
) -> list[ExecutionResult]:
    """Run many programs in parallel (a pool of ``max_workers`` threads, default the CPU count), results in order.

    Keyword arguments go to :func:`run_program`. Threads only wait on their sandbox processes, so the pool adds no
    Python work to the caller; each program still gets its own fresh interpreter.
    """
    _require_consent()
    if stdins is not None and len(stdins) != len(sources):
        raise ValueError(f"stdins has {len(stdins)} entries but sources has {len(sources)}; give one per program")
    workers = max_workers if max_workers is not None else (os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers!r}")
    per_program = list(stdins) if stdins is not None else [None] * len(sources)
    if not sources:
        return []
    with ThreadPoolExecutor(max_workers=min(workers, len(sources)), thread_name_prefix="ponderttt-sandbox") as pool:
        futures = [
            pool.submit(run_program, source, stdin=stdin, **kwargs)
            for source, stdin in zip(sources, per_program, strict=True)
        ]
        return [future.result() for future in futures]
