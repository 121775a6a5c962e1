"""The corpus side of every stage: sources per split, the cached BPE tokenizer, per-process batch pipelines.

Thin glue over `ponderttt.data`: `DataConfig` → its SplitConfig / BPEConfig / PipelineConfig. Each process
yields its rows of the global batch, and the global batches are the same whatever the number of processes:
row r of a training batch comes from its own stream over files r::batch_size (so a host reads only the files
of its rows); a held-out pass is small and read in full by every process.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np

from ponderttt.data import (
    BPEConfig,
    FileTreeSource,
    PackingConfig,
    PipelineConfig,
    SplitConfig,
    build_pipeline,
    stdlib_source,
    train_bpe_on_source,
)
from ponderttt.train.config import ConfigError, DataConfig
from ponderttt.train.distributed import process_rows, say
from ponderttt.train.rundir import CACHE_DIR, disk_errors

HELD_OUT_SHARE = 8  # with --data.max-files N, each held-out split keeps max(4, N // 8) files
SPLITS = ("train", "val", "test")


class Subset:
    """Every k-th file of a random-access source, at most `limit` of them (a stable, spread-out subset)."""

    def __init__(self, source: Any, limit: int) -> None:
        self.source = source
        self.stride = max(1, -(-len(source) // limit))
        self.length = min(limit, -(-len(source) // self.stride))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.length:
            raise IndexError(index)
        return self.source[index * self.stride]

    def __repr__(self) -> str:
        return f"Subset({self.source!r}, files={self.length})"


def split_config(data: DataConfig) -> Any:
    """The train/val/test split of the corpus files from --data.val-fraction and --data.test-fraction."""
    return SplitConfig(val_fraction=data.val_fraction, test_fraction=data.test_fraction)


def listing(data: DataConfig, split: str) -> Any:
    """Every readable file of `split` ("train", "val", "test") of the configured corpus (before --data.max-files);
    its `skipped` counts the entries left out unopened, per reason."""
    if data.corpus == "stdlib":
        return stdlib_source(split, split_config=split_config(data))
    root = pathlib.Path(data.corpus)
    if not root.is_dir():
        raise ConfigError(f"--data.corpus={data.corpus}: not 'stdlib' and not a directory of source files")
    return FileTreeSource(root, split=split, split_config=split_config(data))


def describe_skipped(skipped: dict[str, int]) -> str:
    """'1 broken symlink, 2 not regular file' (reasons sorted), or 'none'."""
    return ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(skipped.items())) or "none"


def _file_limit(data: DataConfig, split: str) -> int | None:
    if data.max_files is None:
        return None
    return data.max_files if split == "train" else max(4, data.max_files // HELD_OUT_SHARE)


def source(data: DataConfig, split: str) -> Any:
    """The files of `split` ("train", "val", "test") of the configured corpus, at most --data.max-files of them (an
    eighth of it for a held-out split); logs the entries the listing skipped."""
    files = listing(data, split)
    if files.skipped:  # never opened: broken or looping symlinks, FIFOs, sockets, devices, unreadable files
        say(f"corpus: {split} split of {files.root}: skipped {sum(files.skipped.values())} entries "
            f"({describe_skipped(files.skipped)})")
    if len(files) == 0:
        raise ConfigError(f"--data.corpus={data.corpus}: the {split} split has no files; use a larger corpus or "
                          f"raise --data.{'val' if split == 'val' else 'test'}-fraction")
    if (limit := _file_limit(data, split)) is not None:
        files = Subset(files, limit)
    return files


def summary(data: DataConfig) -> dict[str, Any]:
    """The corpus as the run read it, for results.json's `data` section: {"corpus": --data.corpus, "skipped": total,
    "splits": {split: {"files": readable files, "used": those read (--data.max-files), "skipped": {reason: count}}}}.
    Lists each split again (no log line)."""
    splits = {}
    for split in SPLITS:
        files = listing(data, split)
        limit = _file_limit(data, split)
        splits[split] = {"files": len(files), "used": len(files) if limit is None else len(Subset(files, limit)),
                         "skipped": dict(sorted(files.skipped.items()))}
    return {"corpus": data.corpus, "skipped": sum(sum(s["skipped"].values()) for s in splits.values()),
            "splits": splits}


def tokenizer(data: DataConfig, output_dir: str | pathlib.Path) -> Any:
    """The byte-level BPE trained on the training split, cached under `<output_dir>/cache/tokenizers/` (DiskFull when
    the cache cannot be written)."""
    cache = pathlib.Path(output_dir) / CACHE_DIR
    with disk_errors(cache / "tokenizers"):
        return train_bpe_on_source(source(data, "train"), BPEConfig(vocab_size=data.vocab_size), cache_dir=cache)


def pipeline_config(data: DataConfig, *, seed: int, forever: bool, shuffle: bool, batch_size: int,
                    shard_index: int = 0, shard_count: int = 1) -> Any:
    """Pipeline settings of one stream: files `shard_index::shard_count` of the split, batches of `batch_size`."""
    return PipelineConfig(packing=PackingConfig(seq_len=data.seq_len, chunk_size=data.chunk_size),
                          batch_size=batch_size, seed=seed, shuffle=shuffle, num_epochs=None if forever else 1,
                          shard_index=shard_index, shard_count=shard_count)


def row_config(data: DataConfig, seed: int, row: int) -> Any:
    """The pipeline of row `row` of the training batch: files row::batch_size, one row at a time, with the
    tokenizing and read-ahead of one whole-batch pipeline shared among the rows (what comes out does not depend
    on either)."""
    config = pipeline_config(data, seed=seed, forever=True, shuffle=True, batch_size=1, shard_index=row,
                             shard_count=data.batch_size)
    share = data.batch_size
    packing = dataclasses.replace(config.packing, tokenize_batch=max(1, config.packing.tokenize_batch // share))
    return dataclasses.replace(config, packing=packing, read_threads=1,
                               prefetch_buffer_size=max(2, config.prefetch_buffer_size // share))


class RowStreams:
    """This process's rows of the global training batch, row r read from its own stream of files r::batch_size.

    Row r of every global batch depends only on (files, seed, r), never on how many processes share the batch:
    1 process reading all rows and N processes reading theirs (`distributed.process_rows`) see the same global
    batches, and each host reads only the files of its rows. Iterator state: one Grain state per row.
    """

    def __init__(self, data: DataConfig, tok: Any, split: str, *, seed: int, rows: slice) -> None:
        files = source(data, split)
        if len(files) < data.batch_size:
            raise ConfigError(f"--data.batch-size={data.batch_size}: each row of the global batch reads its own "
                              f"share of the {split} files, but the split has only {len(files)}; lower "
                              "--data.batch-size or raise --data.max-files")
        self._streams = [iter(build_pipeline(files, tok, row_config(data, seed, row)))
                         for row in range(rows.start, rows.stop)]

    def __iter__(self) -> RowStreams:
        return self

    def __next__(self) -> dict[str, Any]:
        parts = [next(stream) for stream in self._streams]
        return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

    def get_state(self) -> dict[str, Any]:
        """{"rows": [the Grain iterator state of each of this process's rows]}, JSON-ready for the checkpoint."""
        return {"rows": [stream.get_state() for stream in self._streams]}

    def set_state(self, state: dict[str, Any]) -> None:
        """Restores a `get_state` result; ConfigError when it holds a different number of rows than this process
        reads (another --data.batch-size or process count)."""
        if len(state["rows"]) != len(self._streams):
            raise ConfigError(f"the data iterator state holds {len(state['rows'])} rows, this process reads "
                              f"{len(self._streams)}: resume with the same --data.batch-size and process count")
        for stream, row_state in zip(self._streams, state["rows"], strict=True):
            stream.set_state(row_state)


def batches(data: DataConfig, tok: Any, split: str, *, seed: int, forever: bool, shuffle: bool | None = None
            ) -> Any:
    """This process's batches: dicts of [rows, seq_len] arrays (input_ids, targets, loss_mask, doc_ids,
    doc_start), its rows of the global batch. Training streams (`forever`) shuffle and repeat, one stream per
    row (`RowStreams`); held-out streams are read once, in full by every process (they are small), each keeping
    its rows (shuffled by file with `seed` when `shuffle`, so a few batches span many files). Either way the
    global batches do not depend on the process count."""
    rows = process_rows(data.batch_size, jax.process_index(), jax.process_count())
    if forever:
        return RowStreams(data, tok, split, seed=seed, rows=rows)
    return (
        {key: value[rows] for key, value in batch.items()}
        for batch in global_batches(data, tok, split, seed=seed, shuffle=bool(shuffle))
    )


def global_batches(data: DataConfig, tok: Any, split: str, *, seed: int, shuffle: bool) -> Any:
    """A Grain IterDataset of the whole global batches of one pass over `split`."""
    config = pipeline_config(data, seed=seed, forever=False, shuffle=shuffle, batch_size=data.batch_size)
    return build_pipeline(source(data, split), tok, config)


def fixed_batches(data: DataConfig, tok: Any, split: str, count: int) -> list[dict[str, Any]]:
    """The first `count` batches of a held-out split, its files in a fixed shuffled order (the same batches every
    time, drawn from many files rather than the first few); at least one."""
    taken = []
    for batch in batches(data, tok, split, seed=0, forever=False, shuffle=True):
        if len(taken) == count:
            break
        taken.append(batch)
    if not taken:
        raise ConfigError(f"the {split} split of --data.corpus={data.corpus} fills no batch of "
                          f"{data.batch_size} x {data.seq_len} tokens; lower --data.batch-size or --data.seq-len")
    return taken


def language(data: DataConfig) -> str:
    """The language name held-out chunks are reported under: python for the stdlib corpus, else code."""
    return "python" if data.corpus == "stdlib" else "code"
