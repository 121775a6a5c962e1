"""The provenance record: git state of a checkout, and None outside one."""

import subprocess

from ponderttt.train.provenance import git_state, provenance


def test_git_state_of_a_checkout_and_outside_one(tmp_path):
    assert git_state(tmp_path) is None  # not a git checkout: no commit is claimed
    run = lambda *args: subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)
    run("init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    run("add", "a.txt")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.txt").write_text("two\n")  # a tracked file changed: dirty, same commit
    assert git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


def test_provenance_names_packages_libraries_and_devices():
    record = provenance()
    assert record["packages"]["ponderttt-train"] and record["packages"]["ponderttt-ttt"]
    assert all(record["libraries"][name] for name in ("python", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint"))
    assert record["devices"]["local_count"] >= 1 and record["devices"]["process_count"] == 1
