"""`uv run apps/train` rejects bad configuration with an error naming the offending value (issue 8, item 5)."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

APP = pathlib.Path(__file__).resolve().parents[1] / "apps" / "train"


def run_app(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="250")
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, timeout=120, env=env)


def flat(text: str) -> str:
    """The message without tyro's box drawing and line wrapping."""
    return re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", text))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ttt", "--data.chunk-size", "40", "--data.mini-batch-size", "16"],
         "--data.chunk-size=40 is not divisible by --data.mini-batch-size=16"),
        (["compare", "--compare.budgets", "0.5", "1.5"], "--compare.budgets=1.5 is outside (0, 1]"),
        (["gate", "--gate.budget", "0"], "--gate.budget=0.0 is outside (0, 1]"),
        (["gate", "--gate.gates", "gumbel", "hyper"], "unknown gate name 'hyper'"),
        (["compare", "--compare.methods", "skip", "orcale"], "unknown gate name 'orcale'"),
        (["--preset", "laptop"], "--preset='laptop' is not a preset"),
        (["reproduce", "--scales", "7b"], "unknown scale '7b'"),
        (["gate", "--gate.ppo-minibatches", "7"], "--gate.ppo-minibatches=7 does not divide the 32 decisions"),
        (["evaluate", "--evaluate.benchmarks", "humaneval", "leetcode"], "leetcode"),
    ],
)
def test_bad_values_are_named(args, expected):
    proc = run_app(*args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in flat(proc.stderr), proc.stderr


def test_missing_backbone_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-gpt2"
    proc = run_app("ttt", "--backbone.path", str(missing), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert f"--backbone.path={missing}: missing backbone directory" in flat(proc.stderr)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    proc = run_app("ttt", "--backbone.path", str(tmp_path / "half"))
    assert "no *.safetensors file" in flat(proc.stderr)


def test_missing_checkpoint_directory_is_named(tmp_path):
    out = tmp_path / "out"
    (out / "r1").mkdir(parents=True)
    (out / "r1" / "config.json").write_text('{"command": "ttt", "preset": "cpu", "config": {}}')
    proc = run_app("gate", "--output-dir", str(out), "--name", "r1")
    assert proc.returncode == 2
    assert f"missing checkpoint directory {out / 'r1' / 'checkpoints' / 'ttt'}" in flat(proc.stderr)
    proc = run_app("ttt", "--output-dir", str(out), "--name", "r2", "--resume")
    assert proc.returncode == 2
    assert f"missing run directory {out / 'r2'}" in flat(proc.stderr)


def test_missing_reproduce_backbones_are_named(tmp_path):
    proc = run_app("reproduce", "--scales", "125m", "--backbone-root", str(tmp_path))
    assert proc.returncode == 2
    assert f"--scales 125m (under --backbone-root)={tmp_path / 'gpt2'}: missing backbone directory" in flat(
        proc.stderr)


def test_a_malformed_run_config_is_named(tmp_path):
    out = tmp_path / "out"
    (out / "r1").mkdir(parents=True)
    (out / "r1" / "config.json").write_text("{not json")
    proc = run_app("compare", "--output-dir", str(out), "--name", "r1")
    assert proc.returncode == 2
    assert f"{out / 'r1' / 'config.json'}: the run's config record is not valid JSON" in flat(proc.stderr)
    (out / "r1" / "config.json").write_text("[]")
    proc = run_app("analyze", "--output-dir", str(out), "--name", "r1")
    assert proc.returncode == 2 and 'not a run config record (no "config" mapping)' in flat(proc.stderr)


def test_an_output_directory_that_is_a_file_is_named_before_any_work(tmp_path):
    (tmp_path / "taken").write_text("a file")
    proc = run_app("pretrain", "--preset", "smoke", "--output-dir", str(tmp_path / "taken"))
    assert proc.returncode == 2
    assert f"--output-dir={tmp_path / 'taken'} is a file, not a directory" in flat(proc.stderr)
    proc = run_app("pretrain", "--preset", "smoke", "--output-dir", str(tmp_path / "taken" / "runs"))
    assert proc.returncode == 2 and f"{tmp_path / 'taken'} is a file, so the directory cannot be created" in flat(
        proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # nothing was written
