"""`pretrain` end to end on a tiny corpus: trains, logs, checkpoints, caches the backbone, and reuses it."""

import json
import pathlib
import sysconfig

import pytest

from ponderttt.train import cli
from ponderttt.train.metrics import read_jsonl

TINY = ["--data.vocab-size", "300", "--data.seq-len", "64", "--data.chunk-size", "16", "--data.mini-batch-size", "8",
        "--data.batch-size", "2", "--backbone.n-layer", "1", "--backbone.n-head", "2", "--backbone.n-embd", "32",
        "--backbone.pretrain-steps", "6", "--checkpoint-every", "3", "--log-every", "2", "--eval-every", "3",
        "--no-progress"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    """Forty real Python files copied from the standard library (the tests build their own corpus)."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if 2_000 < p.stat().st_size < 40_000)[:40]
    for path in files:
        (folder / path.name).write_bytes(path.read_bytes())
    return folder


@pytest.mark.slow
def test_pretrain_trains_caches_and_reuses(tmp_path, corpus, capsys):
    args = ["pretrain", *TINY, "--data.corpus", str(corpus), "--data.val-fraction", "0.2",
            "--data.test-fraction", "0.2", "--output-dir", str(tmp_path)]
    assert cli.main([*args, "--name", "first"]) == 0
    out = capsys.readouterr().out
    assert "pretrained the in-house GPT-2" in out
    records = read_jsonl(tmp_path / "first" / "metrics.jsonl", "pretrain")
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # log every 2, eval every 3, and the last step
    assert all(r["loss"] > 0 for r in records if "loss" in r) and "eval_loss" in records[-1]
    assert records[-1]["loss"] < records[0]["loss"]  # six steps of Adam do lower the training loss
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    assert config["command"] == "pretrain" and config["config"]["backbone"]["pretrain_steps"] == 6
    caches = sorted((tmp_path / "cache").glob("backbone-*"))
    assert len(caches) == 1 and (caches[0] / "6").is_dir()
    assert list((tmp_path / "cache" / "tokenizers").glob("bpe-300-*.json"))

    assert cli.main([*args, "--name", "second"]) == 0
    assert f"reused the cached in-house GPT-2 in {caches[0]}" in capsys.readouterr().out
    assert not (tmp_path / "second" / "metrics.jsonl").exists()

    assert cli.main([*args, "--name", "first", "--resume", "--seed", "1"]) == 2  # flags differ from the run's
    assert "--seed=1 contradicts run 'first', made with run.seed=0" in capsys.readouterr().err
