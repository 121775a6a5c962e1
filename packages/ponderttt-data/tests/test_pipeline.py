"""Pipelines: resume exactness, process shards, multiprocess prefetch, mixtures, tokenizers, the stdlib default."""

from __future__ import annotations

import json
import os

import grain
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponderttt.data import (
    ROW_KEYS,
    BPEConfig,
    FileTreeSource,
    PackingConfig,
    PipelineConfig,
    as_chunks,
    build_pipeline,
    document_dataset,
    load_tokenizer,
    mixture_pipeline,
    pipeline_stats,
    stdlib_pipeline,
    train_bpe,
)

SMALL = PipelineConfig(packing=PackingConfig(seq_len=24, chunk_size=8, tokenize_batch=3), batch_size=2,
                       read_threads=1, prefetch_buffer_size=4)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(ROW_KEYS)
        for key in ROW_KEYS:
            np.testing.assert_array_equal(x[key], y[key])


@settings(max_examples=12, deadline=None)
@given(stop=st.integers(0, 40), mode=st.sampled_from(["packed", "padded"]), epochs=st.sampled_from([1, 2]))
def test_restored_stream_continues_bit_identically(tree, tokenizer, stop, mode, epochs):
    import dataclasses

    cfg = dataclasses.replace(SMALL, packing=dataclasses.replace(SMALL.packing, mode=mode), num_epochs=epochs)
    full = list(build_pipeline(FileTreeSource(tree), tokenizer, cfg))
    assert len(full) > 20
    it = iter(build_pipeline(FileTreeSource(tree), tokenizer, cfg))
    head = [next(it) for _ in range(min(stop, len(full)))]
    state = json.loads(json.dumps(it.get_state()))  # what Orbax writes: JSON
    fresh = iter(build_pipeline(FileTreeSource(tree), tokenizer, cfg))
    fresh.set_state(state)
    assert_same_batches(head + list(fresh), full)


def test_orbax_grain_checkpoint_handler_round_trip(tree, tokenizer, tmp_path):
    """grain.checkpoint.CheckpointHandler is what Orbax's CheckpointSave / CheckpointRestore call."""
    handler = grain.checkpoint.CheckpointHandler()
    it = iter(build_pipeline(FileTreeSource(tree), tokenizer, SMALL))
    for _ in range(5):
        next(it)
    handler.save(tmp_path, item=it)
    expected = [next(it) for _ in range(6)]
    restored = handler.restore(tmp_path, item=iter(build_pipeline(FileTreeSource(tree), tokenizer, SMALL)))
    assert_same_batches([next(restored) for _ in range(6)], expected)


def test_orbax_checkpoint_manager_round_trip(tree, tokenizer, tmp_path):
    """The way a trainer saves the stream: an Orbax CheckpointManager with grain's CheckpointSave / Restore."""
    import orbax.checkpoint as ocp

    it = iter(build_pipeline(FileTreeSource(tree), tokenizer, SMALL))
    for _ in range(4):
        next(it)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
    expected = [next(it) for _ in range(5)]
    fresh = iter(build_pipeline(FileTreeSource(tree), tokenizer, SMALL))
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        assert manager.latest_step() == 4
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same_batches([next(fresh) for _ in range(5)], expected)


def test_stream_covers_every_document_once(tree, tokenizer):
    source = FileTreeSource(tree)
    it = iter(build_pipeline(source, tokenizer, SMALL))
    batches = list(it)
    stats = pipeline_stats(it)
    assert stats["documents"] == len(source) == 14
    n_real = sum(int((b["doc_ids"] >= 0).sum()) for b in batches)
    expected = sum(len(tokenizer.encode(source[i].data.decode())) + 1 for i in range(len(source)))
    # the last partial batch is dropped (drop_last_batch), so at most one batch of tokens is missing
    assert expected - SMALL.batch_size * 24 < n_real <= expected == stats["tokens"]
    assert stats["rows"] >= len(batches) * SMALL.batch_size
    chunks = as_chunks(batches[0], 8)
    assert chunks["input_ids"].shape == (2, 3, 8) and chunks["input_ids"].dtype == np.int32


def test_process_shards_are_disjoint_and_cover(tree):
    import dataclasses

    keys = []
    for index in range(3):
        cfg = dataclasses.replace(SMALL, shard_index=index, shard_count=3, num_epochs=1)
        keys.append({record.key for record in document_dataset(FileTreeSource(tree), cfg)})
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])
    assert set.union(*keys) == set(FileTreeSource(tree).keys)


SHARD_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"127.0.0.1:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from ponderttt.data import FileTreeSource, PipelineConfig, document_dataset, jax_process_shard
index, count = jax_process_shard()
cfg = PipelineConfig().for_process(index, count)
keys = sorted(r.key for r in document_dataset(FileTreeSource(sys.argv[3]), cfg))
print(json.dumps({"index": index, "count": count, "keys": keys}))
"""


@pytest.mark.slow
def test_two_jax_processes_read_disjoint_shards(tree):
    """Two real JAX processes (gloo on localhost): each reads its own files, chosen by jax_process_shard."""
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", SHARD_SCRIPT, str(port), str(i), str(tree)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert [o["index"] for o in outs] == [0, 1] and all(o["count"] == 2 for o in outs)
    a, b = (set(o["keys"]) for o in outs)
    assert a and b and not a & b and a | b == set(FileTreeSource(tree).keys)


@pytest.mark.slow
def test_multiprocess_prefetch_is_resumable_and_complete(tree, tokenizer):
    """Two worker processes (spawned: ~10 s of imports each on a loaded machine, hence slow)."""
    import dataclasses

    from absl import flags

    flags.FLAGS.mark_as_parsed()
    # Each worker packs and batches its own slice of the files; with drop_last_batch=False every document
    # reaches a batch, so the counts the main process sees (as of the last batch) cover every file.
    cfg = dataclasses.replace(SMALL, num_workers=2, drop_last_batch=False)
    first = iter(build_pipeline(FileTreeSource(tree), tokenizer, cfg))
    for _ in range(3):
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    rest = list(first)
    stats = pipeline_stats(first)  # summed over both workers' packers
    first.close()
    restored = iter(build_pipeline(FileTreeSource(tree), tokenizer, cfg))
    restored.set_state(state)
    assert_same_batches(list(restored), rest)
    restored.close()
    # every document was read by exactly one of the two workers
    assert stats["documents"] == len(FileTreeSource(tree))
    single = iter(build_pipeline(FileTreeSource(tree), tokenizer, dataclasses.replace(cfg, num_workers=0)))
    list(single)
    assert stats["tokens"] == pipeline_stats(single)["tokens"]


def test_mixture_weights_and_pure_rows(tree, tokenizer):
    import dataclasses

    cfg = dataclasses.replace(SMALL, num_epochs=None, batch_size=1)
    sources = {"Python": FileTreeSource(tree, languages=("Python",)), "Go": FileTreeSource(tree, languages=("Go",))}
    go_tokens = set(tokenizer.encode(sources["Go"][0].data.decode()).tolist())
    it = iter(mixture_pipeline(sources, {"Python": 3.0, "Go": 1.0}, tokenizer, cfg))
    from_go = 0
    for _ in range(200):
        row = next(it)
        ids = set(row["input_ids"][0][row["doc_ids"][0] >= 0].tolist()) - {tokenizer.eod_id}
        from_go += ids <= go_tokens  # a row holds one stream only: all Go tokens, or Python ones
    assert 35 <= from_go <= 65  # 1/4 of 200 rows
    with pytest.raises(ValueError, match="same streams"):
        mixture_pipeline(sources, {"Python": 1.0}, tokenizer, cfg)


def test_bpe_is_cached_by_content_and_round_trips(tmp_path, samples):
    texts = [samples["py"], samples["go"], "emoji \U0001f600 and caf\u00e9\n"]
    cfg = BPEConfig(vocab_size=300, min_frequency=1)
    first = train_bpe(texts, cfg, cache_dir=tmp_path)
    files = list((tmp_path / "tokenizers").glob("bpe-300-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    second = train_bpe(iter(texts), cfg, cache_dir=tmp_path)
    assert files[0].stat().st_mtime_ns == mtime and second.tokenizer.to_str() == first.tokenizer.to_str()
    train_bpe(texts[:2], cfg, cache_dir=tmp_path)  # a different corpus is another file
    assert len(list((tmp_path / "tokenizers").glob("bpe-300-*.json"))) == 2
    for text in texts:  # byte-level: any text round-trips exactly
        assert first.decode(first.encode(text)) == text
    assert first.vocab_size == 300 and first.eod_id != first.pad_id
    with pytest.raises(ValueError, match="vocab_size=100"):
        BPEConfig(vocab_size=100)


def test_load_tokenizer_from_directory(tmp_path, tokenizer):
    folder = tmp_path / "gpt2-like"
    folder.mkdir()
    tokenizer.tokenizer.save(str(folder / "tokenizer.json"))
    loaded = load_tokenizer(folder)
    assert loaded.eod_id == tokenizer.eod_id and loaded.encode("def f(): pass").tolist() == \
        tokenizer.encode("def f(): pass").tolist()
    with pytest.raises(ValueError, match="no end-of-document token <eos>"):
        load_tokenizer(folder, eod_token="<eos>")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    for bad in (b"", b"{not json", b"\xff\xfe", b'{"model": 3}'):
        (folder / "tokenizer.json").write_bytes(bad)
        with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer\.json \(") as error:
            load_tokenizer(folder)
        assert "\n" not in str(error.value) and str(folder) in str(error.value)


@pytest.mark.parametrize("family", ["gpt2", "gemma"])
def test_special_tokens_of_known_families(tmp_path, family):
    """GPT-2 has <|endoftext|> and no padding token (EOD pads); Gemma has <eos> and <pad>."""
    import tokenizers
    from tokenizers import models, pre_tokenizers

    specials = {"gpt2": ["<|endoftext|>"], "gemma": ["<pad>", "<eos>", "<bos>"]}[family]
    vocab = {token: i for i, token in enumerate([*specials, "def", "f", "(", ")", ":", "pass", "[UNK]"])}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(specials)
    (tmp_path / family).mkdir()
    tok.save(str(tmp_path / family / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path / family)
    if family == "gpt2":
        assert loaded.eod_id == loaded.pad_id == vocab["<|endoftext|>"]
    else:
        assert (loaded.eod_id, loaded.pad_id) == (vocab["<eos>"], vocab["<pad>"])
    assert loaded.encode("def f ( ) : pass").tolist() == [vocab[t] for t in ("def", "f", "(", ")", ":", "pass")]


@pytest.mark.slow
def test_stdlib_default_pipeline(tmp_path):
    """The offline default end to end: stdlib train split → BPE (cached) → val batches, exact shapes.

    Slow: it reads the whole standard library (~30 MB) and trains a BPE on it."""
    import dataclasses

    cfg = dataclasses.replace(PipelineConfig.tiny(), num_epochs=1)
    ds, tok = stdlib_pipeline("val", cfg, bpe=BPEConfig(vocab_size=320), cache_dir=tmp_path)
    batch = next(iter(ds))
    assert batch["input_ids"].shape == (4, 256) and batch["doc_start"][:, 0].any()
    assert (batch["input_ids"] < tok.vocab_size).all() and batch["loss_mask"].mean() > 0.95
    assert len(os.listdir(tmp_path / "tokenizers")) == 1
