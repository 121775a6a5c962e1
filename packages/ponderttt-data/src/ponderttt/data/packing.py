"""Packing: documents → token stream → sequences of `seq_len` → chunks of `chunk_size`.

The stream is every document's tokens followed by the end-of-document token. A sequence row holds `seq_len`
consecutive stream tokens and, for each position t:

  input_ids[t]  the token                                   int32
  targets[t]    the next stream token (t+1)                  int32
  loss_mask[t]  the target is a real token of the same document as the input (so no loss on padding, and none
                for predicting the next document's first token from the previous one's end-of-document)  bool
  doc_ids[t]    the document's index in this stream (0, 1, 2, ...; -1 on padding)  int32
  doc_start[t]  the first token of a document is here (the `carry` protocol resets fast weights here)   bool

A document longer than a row continues in the next row of the stream with `doc_start` False at position 0.
"packed" mode fills rows end to end; "padded" mode starts every document at a row boundary and pads the
rest of its last row (`doc_ids == -1`, `loss_mask == False`, `input_ids == pad_id`).

`SequencePacker` is the plain-Python packer; `PackedSequenceDataset` is the Grain `IterDataset` around it:
it tokenizes documents in groups (`encode_batch`) and keeps an exactly restorable iterator state.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from ponderttt.data.cleaning import SKIP_REASONS, Document, Skipped
from ponderttt.data.tokenizer import TextTokenizer

PACKING_MODES = ("packed", "padded")
ROW_KEYS = ("input_ids", "targets", "loss_mask", "doc_ids", "doc_start")
_DOC_ID_MODULUS = 2**31  # doc_ids wrap rather than overflow int32


@dataclasses.dataclass(frozen=True)
class PackingConfig:
    """How documents become rows.

    seq_len: tokens per row, a multiple of chunk_size. chunk_size: tokens per chunk (the gate's unit).
    mode: "packed" or "padded". drop_remainder: at the end of a finite stream, drop the last row if its inputs
    needed padding (otherwise it is padded). tokenize_batch: documents tokenized together.
    """

    seq_len: int = 2048
    chunk_size: int = 512
    mode: str = "packed"
    drop_remainder: bool = False
    tokenize_batch: int = 32

    def __post_init__(self):
        if self.seq_len < 1 or self.chunk_size < 1:
            raise ValueError(f"seq_len={self.seq_len} and chunk_size={self.chunk_size} must be positive")
        if self.seq_len % self.chunk_size:
            raise ValueError(
                f"seq_len={self.seq_len} is not a multiple of chunk_size={self.chunk_size}; "
                f"use seq_len={self.chunk_size * max(1, round(self.seq_len / self.chunk_size))}"
            )
        if self.mode not in PACKING_MODES:
            raise ValueError(f"mode={self.mode!r} is not one of {PACKING_MODES}")
        if self.tokenize_batch < 1:
            raise ValueError(f"tokenize_batch={self.tokenize_batch} must be at least 1")

    @property
    def n_chunks(self) -> int:
        """Chunks per row: seq_len // chunk_size."""
        return self.seq_len // self.chunk_size


@dataclasses.dataclass(slots=True)
class _Segment:
    tokens: np.ndarray  # int32 [n]: document tokens, end-of-document token, then padding in "padded" mode
    doc_id: int
    n_real: int  # tokens that belong to the document (the rest is padding)
    tag: Any  # opaque: what the owner needs to re-create this segment (the Grain iterator's state)


class SequencePacker:
    """Turns documents (token arrays) into rows; holds at most one row plus one document of tokens."""

    def __init__(self, seq_len: int, eod_id: int, pad_id: int, mode: str = "packed"):
        if mode not in PACKING_MODES:
            raise ValueError(f"mode={mode!r} is not one of {PACKING_MODES}")
        self.seq_len = seq_len
        self.eod_id = eod_id
        self.pad_id = pad_id
        self.mode = mode
        self._segments: collections.deque[_Segment] = collections.deque()
        self._offset = 0  # tokens of the head segment already emitted
        self._available = 0  # tokens not yet emitted
        self.next_doc_id = 0

    @property
    def available(self) -> int:
        """Tokens added but not yet emitted in a row (end-of-document tokens and "padded"-mode padding included)."""
        return self._available

    @property
    def head(self) -> tuple[Any, int, int] | None:
        """(tag, tokens already emitted, doc_id) of the oldest unfinished document, or None when empty."""
        if not self._segments:
            return None
        first = self._segments[0]
        return first.tag, self._offset, first.doc_id

    def add(self, tokens: np.ndarray, tag: Any = None, doc_id: int | None = None) -> None:
        """Appends one document (its tokens, then the end-of-document token)."""
        n_real = len(tokens) + 1
        pad = (-n_real) % self.seq_len if self.mode == "padded" else 0
        segment = np.empty(n_real + pad, dtype=np.int32)
        segment[: n_real - 1] = tokens
        segment[n_real - 1] = self.eod_id
        segment[n_real:] = self.pad_id
        if doc_id is None:
            doc_id = self.next_doc_id
        self.next_doc_id = (doc_id + 1) % _DOC_ID_MODULUS
        self._segments.append(_Segment(segment, doc_id, n_real, tag))
        self._available += len(segment)

    def skip(self, n: int) -> None:
        """Drops the first `n` tokens of the head document (to restore a state mid-document)."""
        if not self._segments or n > len(self._segments[0].tokens):
            raise ValueError(f"cannot skip {n} tokens: the head document has fewer")
        self._offset += n
        self._available -= n
        if self._offset == len(self._segments[0].tokens):
            self._segments.popleft()
            self._offset = 0

    def ready(self) -> bool:
        """A full row can be emitted (its last target, one token past the row, is known too)."""
        return self._available >= self.seq_len + 1

    def pop(self, final: bool = False) -> dict[str, np.ndarray]:
        """The next row. Without `final`, needs `ready()`; with it, pads whatever is left (needs `available`)."""
        if not (self.ready() or (final and self._available > 0)):
            raise ValueError(f"pop needs {self.seq_len + 1} tokens (or final=True and some), has {self._available}")
        width = self.seq_len + 1
        ids = np.full(width, self.pad_id, dtype=np.int32)
        doc_ids = np.full(width, -1, dtype=np.int32)
        starts = np.zeros(width, dtype=bool)
        filled = 0
        offset = self._offset
        for segment in self._segments:
            if filled == width:
                break
            take = min(len(segment.tokens) - offset, width - filled)
            ids[filled: filled + take] = segment.tokens[offset: offset + take]
            real_end = min(segment.n_real, offset + take)
            if real_end > offset:
                doc_ids[filled: filled + real_end - offset] = segment.doc_id
            if offset == 0:
                starts[filled] = True
            filled += take
            offset = 0
        # Emit seq_len tokens; the last one peeked stays in the buffer as the next row's first input.
        consume = min(self.seq_len, self._available)
        while consume:
            head = self._segments[0]
            step = min(len(head.tokens) - self._offset, consume)
            consume -= step
            self.skip(step)
        inputs = doc_ids[:-1]
        return {
            "input_ids": ids[:-1],
            "targets": ids[1:],
            "loss_mask": (inputs >= 0) & (doc_ids[1:] == inputs),
            "doc_ids": inputs,
            "doc_start": starts[:-1],
        }


def pack_documents(documents: Iterable[Sequence[int] | np.ndarray], *, seq_len: int, eod_id: int, pad_id: int,
                   mode: str = "packed", drop_remainder: bool = False) -> dict[str, np.ndarray]:
    """All rows of a finite list of tokenized documents, stacked: each value [n_rows, seq_len]."""
    packer = SequencePacker(seq_len, eod_id, pad_id, mode)
    rows = []
    for tokens in documents:
        packer.add(np.asarray(tokens, dtype=np.int32))
        while packer.ready():
            rows.append(packer.pop())
    while packer.available:
        padded_inputs = packer.available < seq_len
        row = packer.pop(final=True)
        if not (drop_remainder and padded_inputs):
            rows.append(row)
    if not rows:
        return {key: np.zeros((0, seq_len), dtype=bool if key in ("loss_mask", "doc_start") else np.int32)
                for key in ROW_KEYS}
    return {key: np.stack([row[key] for row in rows]) for key in ROW_KEYS}


def as_chunks(batch: Mapping[str, np.ndarray], chunk_size: int) -> dict[str, np.ndarray]:
    """Views every [..., seq_len] array of a batch as [..., n_chunks, chunk_size] (no copy)."""
    out = {}
    for key, value in batch.items():
        value = np.asarray(value)
        if value.ndim == 0 or value.shape[-1] % chunk_size:
            raise ValueError(f"{key!r} has shape {value.shape}: last axis is not a multiple of chunk_size={chunk_size}")
        out[key] = value.reshape(*value.shape[:-1], value.shape[-1] // chunk_size, chunk_size)
    return out


def chunk_starts_document(doc_start: np.ndarray, chunk_size: int) -> np.ndarray:
    """[..., n_chunks] bool: the chunk's first token is a document's first token (reset before this chunk)."""
    return as_chunks({"doc_start": doc_start}, chunk_size)["doc_start"][..., 0]


def chunk_has_document_start(doc_start: np.ndarray, chunk_size: int) -> np.ndarray:
    """[..., n_chunks] bool: some document starts inside the chunk (a reset happens within it)."""
    return as_chunks({"doc_start": doc_start}, chunk_size)["doc_start"].any(axis=-1)


def _empty_stats() -> dict[str, int]:
    return {"documents": 0, "tokens": 0, "rows": 0, **{f"skipped_{reason}": 0 for reason in SKIP_REASONS}}


class PackedSequenceDataset(grain.IterDataset):
    """Grain `IterDataset`: a stream of `Document` / `Skipped` records → rows (dicts of ROW_KEYS arrays).

    Counts of documents, tokens, rows and skipped files by reason are in the iterator's `stats` and state.
    """

    def __init__(self, parent: grain.IterDataset, tokenizer: TextTokenizer, config: PackingConfig):
        super().__init__(parent)
        self.tokenizer = tokenizer
        self.config = config

    def __iter__(self) -> _PackedSequenceIterator:
        return _PackedSequenceIterator(self._parent.__iter__(), self.tokenizer, self.config)

    def __str__(self) -> str:
        return f"PackedSequenceDataset(seq_len={self.config.seq_len}, mode={self.config.mode!r})"


class _PackedSequenceIterator(grain.DatasetIterator):
    """State = the parent's state just before the oldest unfinished document, how many of that document's
    tokens were emitted, its doc_id and the counts at that point. Restoring re-reads and re-tokenizes that
    document (and those after it), so a restored iterator continues bit-identically."""

    def __init__(self, parent: grain.DatasetIterator, tokenizer: TextTokenizer, config: PackingConfig):
        super().__init__(parent)
        self._tokenizer = tokenizer
        self._config = config
        self._packer = SequencePacker(config.seq_len, tokenizer.eod_id, tokenizer.pad_id, config.mode)
        self._counts = _empty_stats()
        self._exhausted = False
        self._pending_skip = 0  # tokens of the first document to drop after set_state

    @property
    def stats(self) -> dict[str, int]:
        return dict(self._counts)

    def _fill(self) -> None:
        """Reads up to `tokenize_batch` documents from the parent, tokenizes them together, queues them."""
        docs: list[tuple[Document, Any]] = []
        while len(docs) < self._config.tokenize_batch:
            tag = (self._parent.get_state(), dict(self._counts))
            try:
                record = next(self._parent)
            except StopIteration:
                self._exhausted = True
                break
            if isinstance(record, Skipped):
                self._counts[f"skipped_{record.reason}"] += 1
            elif isinstance(record, Document):
                self._counts["documents"] += 1
                docs.append((record, tag))
            else:
                raise TypeError(f"expected Document or Skipped records from the parent dataset, got {type(record)}")
        if not docs:
            return
        for (_, tag), tokens in zip(docs, self._tokenizer.encode_batch([d.text for d, _ in docs]), strict=True):
            tag[1]["tokens"] = self._counts["tokens"]  # the snapshot was taken before this group was tokenized
            self._counts["tokens"] += len(tokens) + 1
            self._packer.add(tokens, tag=tag)
        if self._pending_skip:
            self._packer.skip(self._pending_skip)
            self._pending_skip = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while not self._packer.ready() and not self._exhausted:
            self._fill()
        if self._packer.ready():
            row = self._packer.pop()
        elif self._packer.available and not (self._config.drop_remainder
                                             and self._packer.available < self._config.seq_len):
            row = self._packer.pop(final=True)
        else:
            raise StopIteration
        self._counts["rows"] += 1
        return row

    def get_state(self) -> dict[str, Any]:
        head = self._packer.head
        if head is None:
            return {"parent": self._parent.get_state(), "offset": 0, "doc_id": self._packer.next_doc_id,
                    "stats": dict(self._counts), "exhausted": self._exhausted}
        (parent_state, stats), offset, doc_id = head
        # Rows emitted since the head document was read are counted on top of the snapshot.
        stats = dict(stats, rows=self._counts["rows"])
        return {"parent": parent_state, "offset": offset, "doc_id": doc_id, "stats": stats, "exhausted": False}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._packer = SequencePacker(self._config.seq_len, self._tokenizer.eod_id, self._tokenizer.pad_id,
                                      self._config.mode)
        self._packer.next_doc_id = state["doc_id"]
        self._counts = dict(_empty_stats(), **state["stats"])
        self._exhausted = state["exhausted"]
        self._pending_skip = state["offset"]

    def __str__(self) -> str:
        return f"PackedSequenceDatasetIterator(seq_len={self._config.seq_len}, mode={self._config.mode!r})"
