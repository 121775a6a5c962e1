"""Run directories, cache keys and the file-system checks."""

import datetime
import json
import os

import pytest

from ponderttt.train.config import BackboneConfig, ConfigError, DataConfig, RunConfig, preset
from ponderttt.train.rundir import (
    RunDir,
    cache_dir,
    config_hash,
    list_runs,
    require_backbone_dir,
    resolve_run_dir,
)

NOW = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


def test_fresh_run_names(tmp_path):
    run = RunConfig(output_dir=str(tmp_path))
    assert resolve_run_dir(run, "ttt", "smoke", now=NOW).root == tmp_path / "ttt-smoke-20260102-030405"
    assert resolve_run_dir(RunConfig(output_dir=str(tmp_path), name="mine"), "ttt", "cpu").root == tmp_path / "mine"


def test_resume_finds_the_named_or_newest_run(tmp_path):
    with pytest.raises(ConfigError, match="no run directory under"):
        resolve_run_dir(RunConfig(output_dir=str(tmp_path), resume=True), "ttt", "cpu")
    for i, name in enumerate(["b", "a"]):
        RunDir(tmp_path / name).write_config("ttt", "cpu", preset("ttt", "cpu"))
        os.utime(tmp_path / name / "config.json", (1000 + i, 1000 + i))
    (tmp_path / "cache").mkdir()
    assert list_runs(tmp_path) == ["a", "b"]
    assert resolve_run_dir(RunConfig(output_dir=str(tmp_path), resume=True), "ttt", "cpu").name == "a"
    assert resolve_run_dir(RunConfig(output_dir=str(tmp_path), resume=True, name="b"), "ttt", "cpu").name == "b"
    with pytest.raises(ConfigError, match="missing run directory .*runs under .*: a, b"):
        resolve_run_dir(RunConfig(output_dir=str(tmp_path), resume=True, name="c"), "ttt", "cpu")


def test_config_file_records_command_preset_and_hash(tmp_path):
    config = preset("pipeline", "smoke")
    RunDir(tmp_path / "r").write_config("pipeline", "smoke", config)
    record = json.loads((tmp_path / "r" / "config.json").read_text())
    assert record["command"] == "pipeline" and record["preset"] == "smoke"
    assert record["hash"] == config_hash(config)
    assert record["config"]["data"]["chunk_size"] == config.data.chunk_size


def test_cache_keys_change_with_the_config_only():
    data, backbone = DataConfig(), BackboneConfig()
    assert config_hash(data, backbone) == config_hash(DataConfig(), BackboneConfig())
    assert config_hash(data, backbone) != config_hash(data, BackboneConfig(n_layer=5))
    assert cache_dir("out", "backbone", data, backbone).parent.as_posix() == "out/cache"
    assert cache_dir("out", "backbone", data, backbone).name.startswith("backbone-")


def test_checkpoint_and_backbone_checks(tmp_path):
    run = RunDir(tmp_path / "r")
    assert not run.has_checkpoint("ttt")
    with pytest.raises(ConfigError, match=r"missing checkpoint directory .*checkpoints/ttt: run `uv run apps/train "
                                          r"ttt --name r`"):
        run.require_checkpoint("ttt", produced_by="ttt")
    (run.checkpoints("ttt") / "5").mkdir(parents=True)
    assert run.require_checkpoint("ttt", produced_by="ttt") == run.checkpoints("ttt")
    with pytest.raises(ConfigError, match="missing backbone directory"):
        require_backbone_dir(tmp_path / "nope")
    folder = tmp_path / "gpt2"
    folder.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        require_backbone_dir(folder)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"gpt2: no tokenizer.json in the backbone directory"):
        require_backbone_dir(folder)
    (folder / "tokenizer.json").write_text("{}")
    assert require_backbone_dir(folder) == folder
    (folder / "config.json").write_text('{"model_type": "gpt2", "n_positions": 256}')
    assert require_backbone_dir(folder, seq_len=256) == folder
    with pytest.raises(ConfigError, match=r"--data.seq-len=512 exceeds the 256 positions of the GPT-2 backbone"):
        require_backbone_dir(folder, seq_len=512)
    (folder / "config.json").write_text('{"model_type": "gemma3_text", "max_position_embeddings": 256}')
    assert require_backbone_dir(folder, seq_len=512) == folder  # RoPE: no hard limit
    (folder / "config.json").write_text('{"n_positions": 2')
    with pytest.raises(ConfigError, match=r"gpt2: config.json is not valid JSON \(Expecting"):
        require_backbone_dir(folder)
    (folder / "config.json").write_text("[]")
    with pytest.raises(ConfigError, match="config.json holds a list, not a mapping"):
        require_backbone_dir(folder)
