"""Pipelines: a source → cleaned documents → packed rows → batches, as Grain datasets.

    source (Grain random-access source of RawFile)
      → MapDataset: shard by process (disjoint files) → shuffle (seeded) → repeat → clean (Document | Skipped)
      → to_iter_dataset(ReadOptions)  → PackedSequenceDataset (tokenize in groups, pack)  → batch
      → optional mp_prefetch (worker processes)

Iterators of the result support `get_state()` / `set_state()` (JSON-serialisable; Orbax saves them with
`grain.checkpoint.CheckpointSave`): a restored iterator continues bit-identically.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import grain
from grain.sources import RandomAccessDataSource

from ponderttt.data.cleaning import DEFAULT_CLEANING, Cleaner, CleaningConfig, Decontaminator, Document
from ponderttt.data.packing import PackedSequenceDataset, PackingConfig
from ponderttt.data.sources import RawFile, stdlib_source
from ponderttt.data.split import DEFAULT_SPLIT, SplitConfig
from ponderttt.data.stack_v2 import StackV2Config, StackV2Dataset
from ponderttt.data.tokenizer import DEFAULT_BPE, BPEConfig, TextTokenizer, train_bpe


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """Everything between a source and batches.

    num_epochs: passes over the source (None: forever, reshuffled each epoch). shard_index / shard_count: this
    process's disjoint part of the files (see `jax_process_shard`). read_threads: Grain threads reading and
    cleaning files. num_workers: processes for multiprocess prefetch (0: everything in this process).
    drop_last_batch: drop a final batch smaller than batch_size (keeps shapes fixed for jit).
    """

    packing: PackingConfig = PackingConfig()
    cleaning: CleaningConfig = DEFAULT_CLEANING
    batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = 1
    shard_index: int = 0
    shard_count: int = 1
    read_threads: int = 2
    prefetch_buffer_size: int = 256
    num_workers: int = 0
    drop_last_batch: bool = True

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be at least 1")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index={self.shard_index} must lie in [0, shard_count={self.shard_count})")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ValueError(f"num_epochs={self.num_epochs} must be at least 1 (or None for forever)")
        if self.read_threads < 0 or self.num_workers < 0:
            raise ValueError(f"read_threads={self.read_threads} and num_workers={self.num_workers} must be >= 0")

    @classmethod
    def tiny(cls) -> PipelineConfig:
        """Small rows for tests and smoke runs: seq_len 256, chunks of 64, batches of 4."""
        return cls(packing=PackingConfig(seq_len=256, chunk_size=64), batch_size=4)

    @classmethod
    def cpu_default(cls) -> PipelineConfig:
        """The offline default run on a CPU: seq_len 512, chunks of 128, batches of 8, forever."""
        return cls(packing=PackingConfig(seq_len=512, chunk_size=128), batch_size=8, num_epochs=None)

    @classmethod
    def paper(cls) -> PipelineConfig:
        """The published setting: seq_len 2048 in chunks of 512."""
        return cls(packing=PackingConfig(seq_len=2048, chunk_size=512), batch_size=8, num_epochs=None)

    def for_process(self, process_index: int, process_count: int) -> PipelineConfig:
        """This config reading shard `process_index` of `process_count` (e.g. from `jax_process_shard()`)."""
        return dataclasses.replace(self, shard_index=process_index, shard_count=process_count)


def jax_process_shard() -> tuple[int, int]:
    """(jax.process_index(), jax.process_count()), via Grain (which imports jax itself); (0, 1) without jax."""
    try:
        options = grain.sharding.ShardByJaxProcess()
    except (ImportError, ModuleNotFoundError):
        return 0, 1
    return options.shard_index, options.shard_count


def document_dataset(source: RandomAccessDataSource[RawFile], config: PipelineConfig = PipelineConfig(),
                     decontaminator: Decontaminator | None = None) -> grain.MapDataset:
    """MapDataset of `Document` / `Skipped`: this process's shard of `source`, shuffled, repeated, cleaned."""
    if len(source) == 0:
        raise ValueError(f"source {source!r} has no files (check its root, languages and split)")
    ds = grain.MapDataset.source(source)
    if config.shard_count > 1:
        ds = ds[config.shard_index:: config.shard_count]
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)
    if config.num_epochs != 1:
        ds = ds.repeat(config.num_epochs)
    return ds.map(Cleaner(config.cleaning, decontaminator))


def _read_options(config: PipelineConfig) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch_buffer_size)


def sequence_dataset(source: RandomAccessDataSource[RawFile], tokenizer: TextTokenizer,
                     config: PipelineConfig = PipelineConfig(),
                     decontaminator: Decontaminator | None = None) -> grain.IterDataset:
    """IterDataset of packed rows (dicts of [seq_len] arrays, see `ponderttt.data.packing`)."""
    docs = document_dataset(source, config, decontaminator).to_iter_dataset(_read_options(config))
    return PackedSequenceDataset(docs, tokenizer, config.packing)


def _finish(rows: grain.IterDataset, config: PipelineConfig) -> grain.IterDataset:
    batches = rows.batch(config.batch_size, drop_remainder=config.drop_last_batch)
    if config.num_workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
    return batches


def build_pipeline(source: RandomAccessDataSource[RawFile], tokenizer: TextTokenizer,
                   config: PipelineConfig = PipelineConfig(),
                   decontaminator: Decontaminator | None = None) -> grain.IterDataset:
    """IterDataset of batches: dicts of arrays [batch_size, seq_len] (input_ids, targets, loss_mask, doc_ids,
    doc_start). View them as chunks with `as_chunks(batch, config.packing.chunk_size)`."""
    return _finish(sequence_dataset(source, tokenizer, config, decontaminator), config)


def stack_v2_pipeline(stack: StackV2Config, tokenizer: TextTokenizer, config: PipelineConfig = PipelineConfig(), *,
                      split: str | None = "train", split_config: SplitConfig = DEFAULT_SPLIT,
                      decontaminator: Decontaminator | None = None) -> grain.IterDataset:
    """Batches from The Stack v2 (ids streamed with `datasets`, contents from S3; see `ponderttt.data.stack_v2`).

    Rows are read in stream order (no global shuffle), sharded by `config.shard_index / shard_count`, and
    `config.num_epochs` passes are made. Contents are fetched by threads (`stack.max_workers`), so
    `config.num_workers` must be 0 here: an IterDataset source cannot be split among worker processes.
    """
    if config.num_workers:
        raise ValueError(
            f"num_workers={config.num_workers}: The Stack v2 stream cannot be split among prefetch processes; "
            "use num_workers=0 (fetching is already concurrent: raise StackV2Config.max_workers instead)"
        )
    if stack.max_bytes > config.cleaning.max_bytes:
        stack = dataclasses.replace(stack, max_bytes=config.cleaning.max_bytes)
    files = StackV2Dataset(stack, split=split, split_config=split_config, shard_index=config.shard_index,
                           shard_count=config.shard_count)
    if config.num_epochs != 1:
        files = grain.experimental.RepeatIterDataset(files, config.num_epochs)
    docs = files.map(Cleaner(config.cleaning, decontaminator))
    return _finish(PackedSequenceDataset(docs, tokenizer, config.packing), config)


def mixture_pipeline(sources: Mapping[str, RandomAccessDataSource[RawFile]], weights: Mapping[str, float],
                     tokenizer: TextTokenizer, config: PipelineConfig = PipelineConfig(),
                     decontaminator: Decontaminator | None = None) -> grain.IterDataset:
    """Batches whose rows come from named streams (e.g. one per language) in proportion to `weights`.

    Each stream is packed on its own (a row never mixes streams). The mixture stops when any stream ends:
    use num_epochs=None for an endless mixture.
    """
    if set(sources) != set(weights):
        raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} must name the same streams")
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"weights must be positive, got {dict(weights)}")
    streams = {name: sequence_dataset(src, tokenizer, config, decontaminator) for name, src in sources.items()}
    return _finish(grain.IterDataset.mix(streams, {name: float(weights[name]) for name in streams}), config)


def iter_documents(source: RandomAccessDataSource[RawFile], cleaning: CleaningConfig = DEFAULT_CLEANING,
                   decontaminator: Decontaminator | None = None) -> Iterator[Document]:
    """The clean documents of `source`, in source order, in this process (for tokenizer training, audits)."""
    cleaner = Cleaner(cleaning, decontaminator)
    for index in range(len(source)):
        record = cleaner(source[index])
        if isinstance(record, Document):
            yield record


def train_bpe_on_source(source: RandomAccessDataSource[RawFile], bpe: BPEConfig = DEFAULT_BPE,
                        cleaning: CleaningConfig = DEFAULT_CLEANING, *,
                        cache_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """A byte-level BPE trained on the clean documents of `source` (cached by their content hash)."""
    return train_bpe((doc.text for doc in iter_documents(source, cleaning)), bpe, cache_dir=cache_dir)


def stdlib_pipeline(split: str = "train", config: PipelineConfig | None = None, *,
                    bpe: BPEConfig = DEFAULT_BPE, split_config: SplitConfig = DEFAULT_SPLIT,
                    cache_dir: str | os.PathLike | None = None) -> tuple[grain.IterDataset, TextTokenizer]:
    """The offline default: batches from the interpreter's standard library, with a BPE trained (and cached)
    on its train split. Returns (dataset of batches, tokenizer). `config=None` means `PipelineConfig.cpu_default()`."""
    config = config if config is not None else PipelineConfig.cpu_default()
    tokenizer = train_bpe_on_source(stdlib_source("train", split_config=split_config,
                                                  read_limit=config.cleaning.max_bytes),
                                    bpe, config.cleaning, cache_dir=cache_dir)
    source = stdlib_source(split, split_config=split_config, read_limit=config.cleaning.max_bytes)
    return build_pipeline(source, tokenizer, config), tokenizer


def _collect(state: Any, totals: dict[str, int]) -> None:
    if isinstance(state, Mapping):
        if "stats" in state and "doc_id" in state and isinstance(state["stats"], Mapping):
            for key, value in state["stats"].items():
                totals[key] = totals.get(key, 0) + int(value)
            return
        for value in state.values():
            _collect(value, totals)
    elif isinstance(state, list | tuple):
        for value in state:
            _collect(value, totals)


def pipeline_stats(iterator: grain.DatasetIterator | Mapping) -> dict[str, int]:
    """Counts (documents, tokens, rows, skipped_<reason>) summed over every packer in an iterator (or its state),
    worker processes included. Counts cover everything read so far, including documents still buffered."""
    totals: dict[str, int] = {}
    _collect(iterator if isinstance(iterator, Mapping) else iterator.get_state(), totals)
    return totals

