"""Shared pytest setup for every test directory of the workspace.

Imports only the standard library and pytest, so it works in each package's isolated environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Callable

import pytest

# Tests run on the CPU; quiet the accelerator probing on machines without one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole suite: the xdist workers and every app process a test starts
# (they inherit the variable) compile an identical program once; keyed by the program, jax and flags, so stale
# entries are never used. Set JAX_COMPILATION_CACHE_DIR yourself to put it elsewhere.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.abspath(__file__)), ".pytest_cache", "jax")
)


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with a test marked slow run first (their order, and the order inside each file, kept): with the
    workers taking whole files (`--dist loadfile`), the long pipeline tests start at once instead of ending the
    run alone on one worker."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_files)

try:  # every package's dev group has hypothesis; this file must not require it
    from hypothesis import settings as _hypothesis_settings
except ImportError:  # pragma: no cover
    pass
else:
    # CI (CI=true) explores the same examples on every run, so a red CI is reproducible; locally hypothesis
    # draws new examples each run and keeps exploring.
    _hypothesis_settings.register_profile("ci", derandomize=True, print_blob=True)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        _hypothesis_settings.load_profile("ci")

FAKE_DEVICE_COUNT = 8


def run_with_fake_devices(source: str, n_devices: int = FAKE_DEVICE_COUNT, timeout_s: float = 600.0) -> str:
    """Runs `source` in a fresh interpreter that sees `n_devices` CPU devices; returns its stdout.

    XLA reads XLA_FLAGS once, when jax is first imported, so a test process that has already
    imported jax cannot change its device count: the body must run in a subprocess.
    Fails the calling test with the subprocess's output when it exits non-zero.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"subprocess with {n_devices} fake devices exited {proc.returncode}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}",
            pytrace=False,
        )
    return proc.stdout


@pytest.fixture
def multidevice() -> Callable[..., str]:
    """`multidevice(source, n_devices=8)` runs `source` with fake CPU devices and returns its stdout."""
    return run_with_fake_devices
