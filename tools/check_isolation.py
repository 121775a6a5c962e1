"""Checks that every workspace package stands on its own.

For each package under packages/:
  1. its tests work in an environment holding only that package and its declared dependencies
     (`uv run --exact --package <pkg>`, in `.venvs/<pkg>` so the main `.venv` is untouched). By default every test
     module is collected there (so every module the tests import, and the package's own modules they import, must
     resolve with the declared dependencies alone) and the package's own checks (`tests/test_package*.py`: imports of
     every public module, entry points, versions) run; `--full-tests` runs all its tests not marked slow instead.
     The full tests run once, in the workspace suite (`uv run pytest`), with the same code: CI does not repeat them;
  2. `uv build --package <pkg>` gives a wheel that installs into an empty venv and imports.

Usage: uv run python tools/check_isolation.py [--only ponderttt-ttt ...] [--full-tests] [--skip-tests] [--skip-wheels]
Exit status 0 when everything holds; otherwise 1, with a summary of what failed.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def uv() -> list[str]:
    exe = shutil.which("uv")
    return [exe] if exe else [sys.executable, "-m", "uv"]


def packages() -> dict[str, pathlib.Path]:
    found = {}
    for pyproject in sorted(ROOT.glob("packages/*/pyproject.toml")):
        found[tomllib.loads(pyproject.read_text())["project"]["name"]] = pyproject.parent
    return found


def internal_dependencies(name: str, members: dict[str, pathlib.Path]) -> list[str]:
    """Workspace packages `name` needs, transitively, itself last."""
    order: list[str] = []

    def visit(pkg: str) -> None:
        deps = tomllib.loads((members[pkg] / "pyproject.toml").read_text())["project"]["dependencies"]
        for dep in deps:
            dep_name = dep.split(">")[0].split("=")[0].split("<")[0].strip()
            if dep_name in members and dep_name not in order:
                visit(dep_name)
        if pkg not in order:
            order.append(pkg)

    visit(name)
    return order


def run(cmd: list[str], cwd: pathlib.Path | str = ROOT, env: dict[str, str] | None = None) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env).returncode


def check_tests(name: str, folder: pathlib.Path, *, full: bool) -> bool:
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(ROOT / ".venvs" / name))
    env.pop("VIRTUAL_ENV", None)
    tests = folder.relative_to(ROOT) / "tests"
    pytest = [*uv(), "run", "--locked", "--exact", "--package", name, "pytest", "-q", "-p", "no:cacheprovider"]
    if full:
        runs = [[*pytest, "-m", "not slow", str(tests)]]
    else:
        own = sorted(str(p.relative_to(ROOT)) for p in (ROOT / tests).glob("test_package*.py"))
        if not own:
            print(f"FAIL {name}: no tests/test_package*.py (the package's own checks)", flush=True)
            return False
        runs = [[*pytest, "--collect-only", str(tests)], [*pytest, *own]]
    for cmd in runs:
        rc = run(cmd, env=env)
        if rc == 5:
            print(f"FAIL {name}: pytest collected no tests", flush=True)
        if rc != 0:
            return False
    return True


def check_wheel(name: str, members: dict[str, pathlib.Path], dist: pathlib.Path) -> bool:
    wheels = []
    for dep in internal_dependencies(name, members):
        found = sorted(dist.glob(dep.replace("-", "_") + "-*.whl"))
        if not found:
            print(f"FAIL {name}: no wheel built for {dep}", flush=True)
            return False
        wheels.append(str(found[-1]))
    with tempfile.TemporaryDirectory(prefix=f"{name}-venv-") as tmp:
        venv = pathlib.Path(tmp) / "venv"
        if run([*uv(), "venv", "-q", "--python", sys.executable, str(venv)]) != 0:
            return False
        python = str(venv / "bin" / "python")
        if run([*uv(), "pip", "install", "-q", "--python", python, *wheels]) != 0:
            return False
        module = "ponderttt." + name.removeprefix("ponderttt-")
        code = f"import {module} as m; print('imported', m.__name__, m.__version__)"
        return run([python, "-c", code], cwd=tmp) == 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help="package names to check (default: all)")
    parser.add_argument("--full-tests", action="store_true", help="run every test not marked slow in isolation")
    parser.add_argument("--skip-tests", action="store_true", help="only build and install wheels")
    parser.add_argument("--skip-wheels", action="store_true", help="only run the isolated tests")
    args = parser.parse_args()

    members = packages()
    selected = args.only or list(members)
    unknown = sorted(set(selected) - set(members))
    if unknown:
        parser.error(f"unknown package(s) {unknown}; the workspace has {sorted(members)}")

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ponderttt-dist-") as dist_dir:
        dist = pathlib.Path(dist_dir)
        if not args.skip_wheels:
            for name in members:  # every wheel: dependants install their workspace dependencies from here
                if run([*uv(), "build", "-q", "--package", name, "--wheel", "--out-dir", str(dist)]) != 0:
                    failures.append(f"{name}: uv build failed")
        for name in selected:
            if not args.skip_tests and not check_tests(name, members[name], full=args.full_tests):
                failures.append(f"{name}: tests fail with only its own dependencies")
            if not args.skip_wheels and not check_wheel(name, members, dist):
                failures.append(f"{name}: built wheel does not install and import in an empty venv")

    if failures:
        print("isolation check FAILED:\n  " + "\n  ".join(failures), flush=True)
        return 1
    print(f"isolation check passed for {len(selected)} package(s): {', '.join(selected)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
