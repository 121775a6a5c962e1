"""Where a command's config comes from: the run's own config.json for commands on an existing run (no preset or
flag repeated; a contradicting flag is an error naming both values; no training flags on compare / analyze /
evaluate), `--config FILE` (JSON or YAML; flags override it) and `--print-config` (round-trips through --config).
Runs are recorded by hand here (no training): what is checked is the configuration, before anything runs."""

import dataclasses
import json

import pytest

from ponderttt.train import cli
from ponderttt.train.config import ConfigError, preset
from ponderttt.train.rundir import RunDir, config_hash


@pytest.fixture
def run(tmp_path):
    """outputs/r1 made by `pipeline --preset smoke --data.seq-len 64 --adapter.num-heads 4 --seed 7`."""
    base = preset("pipeline", "smoke")
    config = dataclasses.replace(
        base, run=dataclasses.replace(base.run, output_dir=str(tmp_path), name="r1", seed=7),
        data=dataclasses.replace(base.data, seq_len=64), adapter=dataclasses.replace(base.adapter, num_heads=4),
        compare=dataclasses.replace(base.compare, n_resamples=321))
    RunDir(tmp_path / "r1").write_config("pipeline", "smoke", config)
    return tmp_path, config


def parse(*args):
    return cli.parse(list(args))


def test_a_later_command_takes_the_run_config(run):
    out, made = run
    for command in ("gate", "compare", "analyze", "evaluate"):
        name, preset_name, config = parse(command, "--output-dir", str(out), "--name", "r1")
        assert (name, preset_name) == (command, "smoke")
        assert config.data == made.data and config.adapter == made.adapter and config.backbone == made.backbone
        assert config.run.seed == 7 and config.run.name == "r1"
        if command != "gate":  # the run's comparison settings, e.g. its one bootstrap count
            assert config.compare.n_resamples == 321
    # the command's own settings stay open
    _, _, config = parse("compare", "--output-dir", str(out), "--name", "r1", "--compare.budgets", "0.25", "0.75")
    assert config.compare.budgets == (0.25, 0.75) and config.compare.n_resamples == 321


def test_a_flag_that_contradicts_the_run_names_both_values(run):
    out, _ = run
    where = ("--output-dir", str(out), "--name", "r1")
    with pytest.raises(ConfigError, match=r"--data.seq-len=128 contradicts run 'r1', made with data.seq_len=64 "
                                          r"\(.*r1/config.json\)"):
        parse("compare", *where, "--data.seq-len", "128")
    with pytest.raises(ConfigError, match=r"--adapter.num-heads=2 contradicts .* adapter.num_heads=4; --seed=1 "
                                          r"contradicts run 'r1', made with run.seed=7"):
        parse("gate", *where, "--adapter.num-heads", "2", "--seed", "1")
    with pytest.raises(ConfigError, match="--preset cpu contradicts run 'r1', made with --preset smoke"):
        parse("analyze", *where, "--preset", "cpu")
    assert parse("analyze", *where, "--preset", "smoke", "--data.seq-len", "64")[1] == "smoke"  # the same: fine


def test_training_flags_are_not_offered_on_commands_that_read_a_run(run, capsys):
    out, _ = run
    where = ("--output-dir", str(out), "--name", "r1")
    with pytest.raises(ConfigError, match=r"--adapter.lr: `compare` reads the backbone, adapter, gate of the run"):
        parse("compare", *where, "--adapter.lr", "1e-2")
    with pytest.raises(ConfigError, match=r"--backbone.pretrain-steps: `evaluate` reads the backbone, adapter"):
        parse("evaluate", *where, "--backbone.pretrain-steps=5")
    with pytest.raises(ConfigError, match="--checkpoint-every: `analyze` trains nothing"):
        parse("analyze", *where, "--checkpoint-every", "5")
    helps = {}
    for command in ("compare", "analyze", "evaluate", "ttt", "gate"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        helps[command] = capsys.readouterr().out
    for command in ("compare", "analyze", "evaluate"):
        assert "--adapter.lr" not in helps[command] and "--backbone.pretrain-lr" not in helps[command]
        assert "--gate.train-steps" not in helps[command] and "--log-every" not in helps[command]
        assert "--data.seq-len" in helps[command] and "--seed" in helps[command]
    assert "--adapter.lr" in helps["ttt"] and "--log-every" in helps["ttt"] and "--gate.lr" in helps["gate"]


def test_compare_reads_the_gates_as_the_gate_command_trained_them(run):
    out, made = run
    gate_run = dataclasses.replace(preset("gate", "smoke"), run=made.run, data=made.data, adapter=made.adapter,
                                   gate=dataclasses.replace(made.gate, scale_max=3.0))
    RunDir(out / "r1").write_config("gate", "smoke", gate_run, file=out / "r1" / "config-gate.json")
    config = parse("compare", "--output-dir", str(out), "--name", "r1")[2]
    assert config.gate.scale_max == 3.0


def test_resume_takes_the_recorded_config_and_refuses_other_values(run):
    out, made = run
    config = parse("--output-dir", str(out), "--name", "r1", "--resume")[2]
    assert config_hash(config) == config_hash(made) and config.run.resume
    with pytest.raises(ConfigError, match=r"--adapter.lr=0.5 contradicts run 'r1', made with adapter.lr=0.003"):
        parse("--output-dir", str(out), "--name", "r1", "--resume", "--adapter.lr", "0.5")
    # where it runs and how it shows progress are not the run's: free
    assert not parse("--output-dir", str(out), "--name", "r1", "--resume", "--no-progress")[2].run.progress


def test_print_config_round_trips_through_config(run, tmp_path, capsys):
    out, made = run
    assert cli.main(["ttt", "--preset", "smoke", "--adapter.lr", "0.5", "--print-config"]) == 0
    printed = capsys.readouterr().out
    record = json.loads(printed)
    assert (record["command"], record["preset"], record["config"]["adapter"]["lr"]) == ("ttt", "smoke", 0.5)
    (tmp_path / "ttt.json").write_text(printed)
    assert cli.main(["ttt", "--config", str(tmp_path / "ttt.json"), "--print-config"]) == 0
    assert capsys.readouterr().out == printed
    # a run's config.json is a config file: the same resolved config, the same hash
    _, preset_name, config = parse("--config", str(out / "r1" / "config.json"))
    assert preset_name == "smoke" and config_hash(config) == config_hash(made)
    # flags override the file; YAML with a few fields of a few sections
    (tmp_path / "c.yaml").write_text("adapter:\n  kind: mlp\n  lr: 0.25\nplatform:\n  mesh:\n    fsdp: 2\n")
    config = parse("ttt", "--config", str(tmp_path / "c.yaml"), "--adapter.lr", "0.125")[2]
    assert (config.adapter.kind, config.adapter.lr, config.platform.mesh.fsdp) == ("mlp", 0.125, 2)
    assert config.adapter.num_heads == preset("ttt").adapter.num_heads  # the rest from the preset


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ("{not json", ".json", r"--config .*bad.json: not valid JSON: Expecting property name .*line 1"),
    ("adapter: [1, 2", ".yaml", r"--config .*bad.yaml: not valid YAML"),
    ("[1, 2]", ".json", "expected a mapping of sections"),
    ('{"adaptor": {}}', ".json", r"unknown section\(s\) adaptor"),
    ('{"adapter": {"lrr": 1}}', ".json", r"adapter: unknown field\(s\) lrr; fields: kind, num_heads"),
    ('{"adapter": {"kind": "conv"}}', ".json", r"adapter.kind='conv' is not one of 'linear', 'mlp', 'lora'"),
    ('{"adapter": {"lr": "fast"}}', ".json", r"adapter.lr='fast' must be float"),
    ('{"adapter": {"lr": -1}}', ".json", r"--adapter.lr=-1.0 must be positive"),
    ('{"compare": {"budgets": 0.5}}', ".json", r"compare.budgets=0.5 must be a list"),
])
def test_bad_config_files_name_the_file_and_the_value(tmp_path, text, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        parse("pipeline", "--config", str(path))
    with pytest.raises(ConfigError, match="no such file"):
        parse("--config", str(tmp_path / "missing.json"))


@pytest.mark.parametrize(("flags", "message"), [
    (["--adapter.beta", "inf"], "--adapter.beta=inf must be finite"),
    (["--adapter.base-lr", "inf"], "--adapter.base-lr=inf must be finite"),
    (["--evaluate.timeout-s", "inf"], "--evaluate.timeout-s=inf must be finite"),
    (["--evaluate.temperature", "inf"], "--evaluate.temperature=inf must be finite"),
    (["--seed", "-1"], r"--seed=-1 must lie in \[0, 2\^32\)"),
    (["--seed", str(2**32)], r"--seed=4294967296 must lie in \[0, 2\^32\)"),
])
def test_non_finite_and_out_of_range_values_are_refused_at_parse_time(flags, message):
    with pytest.raises(ConfigError, match=message):
        parse(*flags)


def test_duplicate_budgets_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse("--compare.budgets", "0.5", "0.5")
    assert exit_.value.code == 2 and "--compare.budgets=0.5 0.5 names a budget twice" in capsys.readouterr().err
