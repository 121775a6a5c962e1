"""The command line: top-level and per-command help, presets, dispatch, exit codes, light startup."""

import os
import pathlib
import subprocess
import sys

import pytest

from ponderttt.train import cli
from ponderttt.train.config import COMMANDS, PRESET_NAMES, ConfigError, PipelineCommand, TTTCommand

APP = pathlib.Path(__file__).resolve().parents[1]


def run_app(*args: str, cwd: pathlib.Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="250")
    return subprocess.run([sys.executable, str(APP), *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env=env)


def test_help_runs_from_the_app_directory():
    proc = run_app("--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: uv run apps/train" in proc.stdout
    for command in COMMANDS:
        assert f"  {command} " in proc.stdout
    for name in PRESET_NAMES:
        assert name in proc.stdout


def test_command_help_does_not_import_jax():
    source = (
        "import sys\n"
        "from ponderttt.train.cli import main\n"
        "try:\n"
        "    main(['ttt', '--help'])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in ('jax', 'flax', 'orbax', 'optax', 'tensorboardX', 'numpy') if m in sys.modules)\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, COLUMNS="250"))
    assert proc.returncode == 0, proc.stderr
    assert "usage: uv run apps/train ttt" in proc.stdout
    assert "--adapter.beta" in proc.stdout and "--resume" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: uv run apps/train {command}" in out
    assert "--preset" in out  # the preset paragraph of the description


def test_no_command_means_pipeline_and_flags_override_the_preset():
    command, preset, config = cli.parse(["--preset", "smoke", "--data.batch-size", "6", "--seed", "3"])
    assert (command, preset) == ("pipeline", "smoke")
    assert isinstance(config, PipelineCommand)
    assert config.data.batch_size == 6 and config.run.seed == 3
    assert config.data.seq_len == 128  # from the smoke preset
    command, preset, config = cli.parse(["ttt", "--adapter.update-steps", "2", "--preset=gpu"])
    assert (command, preset) == ("ttt", "gpu") and isinstance(config, TTTCommand)
    assert config.adapter.update_steps == 2 and config.platform.dtype == "bfloat16" and config.platform.remat


def test_split_preset_errors_name_the_value():
    with pytest.raises(ConfigError, match="'laptop'"):
        cli.split_preset(["--preset", "laptop"])
    with pytest.raises(ConfigError, match="needs a value"):
        cli.split_preset(["--preset"])
    assert cli.split_preset(["--seed", "1"]) == ("cpu", ["--seed", "1"])


def test_unknown_command_is_a_usage_error():
    proc = run_app("train-everything")
    assert proc.returncode == cli.EXIT_USAGE
    assert "unknown command 'train-everything'" in proc.stderr


def test_evaluate_without_benchmarks_says_what_it_needs_and_writes_nothing(tmp_path):
    run = tmp_path / "out" / "r"
    (run / "checkpoints" / "ttt" / "3").mkdir(parents=True)  # what `evaluate` needs of the run
    (run / "config.json").write_text('{"command": "ttt", "preset": "smoke", "config": {}}')
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    proc = run_app("evaluate", "--preset", "smoke", "--output-dir", str(tmp_path / "out"), "--name", "r")
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr
    assert "`evaluate` needs --evaluate.benchmark-dir DIR" in proc.stderr
    proc = run_app("evaluate", "--preset", "smoke", "--output-dir", str(tmp_path / "out"), "--name", "r",
                   "--evaluate.benchmark-dir", str(tmp_path / "none"))
    assert proc.returncode == cli.EXIT_USAGE and "none: missing directory" in proc.stderr
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_version():
    proc = run_app("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("ponderttt-train ")
