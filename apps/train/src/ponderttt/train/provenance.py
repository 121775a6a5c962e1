"""What produced a run: code version, library versions and devices, recorded in config.json and results.json.

`provenance()` returns a JSON-ready dict:
  git            {"commit": sha, "dirty": bool} of the checkout the app runs from, or None outside a git checkout
  packages       the version of every installed ponderttt distribution (ponderttt-ttt, -models, ..., -train)
  libraries      python, jax, jaxlib, flax, optax, orbax-checkpoint, grain, numpy (None when not installed)
  devices        the backend, the kind of the devices, the local and global device counts, the process count
Nothing here reads a machine path into the record.
"""

from __future__ import annotations

import functools
import pathlib
import platform
import subprocess
from importlib import metadata
from typing import Any

import jax

LIBRARIES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
SOURCE = pathlib.Path(__file__).resolve().parent


def git_state(where: pathlib.Path = SOURCE) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the git checkout holding `where`; None when it is not in one (an installed wheel) or
    git is not available."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=where, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """Versions of the installed ponderttt distributions, by name."""
    found = {d.metadata["Name"]: d.version for d in metadata.distributions()}
    return dict(sorted((name, v) for name, v in found.items() if name and name.startswith("ponderttt")))


@functools.cache
def provenance() -> dict[str, Any]:
    """The code, library and device record of this process (see the module doc); taken once per process (the
    config file and the results of a run share it). Callers must not mutate it."""
    devices = jax.devices()
    return {
        "git": git_state(),
        "packages": package_versions(),
        "libraries": {"python": platform.python_version(), **{name: _version(name) for name in LIBRARIES}},
        "devices": {
            "backend": jax.default_backend(),
            "kind": sorted({d.device_kind for d in devices}),
            "local_count": jax.local_device_count(),
            "global_count": jax.device_count(),
            "process_count": jax.process_count(),
        },
    }
