"""Tokenizers: Hugging Face tokenizers (local directory or hub id) and a byte-level BPE trained on a source.

`TextTokenizer` wraps a `tokenizers.Tokenizer` with the ids the packer needs: `eod_id` (the end-of-document
token placed after every document) and `pad_id`. `train_bpe` trains a byte-level BPE on the documents of
a source and caches it under a name derived from a hash of those documents and the training settings, so
the second call with the same corpus loads the file instead of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# End-of-document tokens of known families, in the order they are looked for: GPT-2, Gemma, Llama-style.
KNOWN_EOD_TOKENS = ("<|endoftext|>", "<eos>", "</s>", "<|end_of_text|>")
KNOWN_PAD_TOKENS = ("<|pad|>", "<pad>", "[PAD]")
_BPE_FORMAT_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class TextTokenizer:
    """A `tokenizers.Tokenizer` plus its end-of-document and padding ids."""

    tokenizer: tokenizers.Tokenizer
    eod_id: int
    pad_id: int
    name: str = ""

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added (special) tokens included: ids lie in [0, vocab_size)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, int32, without special tokens."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of several texts at once (parallel inside the Rust library)."""
        # encode_batch_fast (tokenizers >= 0.21) skips character offsets, which packing never uses: ~10% faster.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = encode(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token `ids` (any integers, numpy ones included); special tokens are kept in the text."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _find_token(tokenizer: tokenizers.Tokenizer, candidates: Sequence[str]) -> int | None:
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def wrap_tokenizer(tokenizer: tokenizers.Tokenizer, *, eod_token: str | None = None, pad_token: str | None = None,
                   name: str = "") -> TextTokenizer:
    """A `TextTokenizer` for `tokenizer`, finding the end-of-document and padding tokens by name.

    Without a padding token (GPT-2 has none) the end-of-document id pads: padded positions are told apart by
    `doc_ids == -1` and `loss_mask == False`, never by their id.
    """
    eod_id = _find_token(tokenizer, (eod_token,) if eod_token else KNOWN_EOD_TOKENS)
    if eod_id is None:
        wanted = eod_token or f"one of {KNOWN_EOD_TOKENS}"
        raise ValueError(f"tokenizer {name!r} has no end-of-document token {wanted}; pass eod_token='<its token>'")
    pad_id = _find_token(tokenizer, (pad_token,) if pad_token else KNOWN_PAD_TOKENS)
    if pad_id is None:
        if pad_token:
            raise ValueError(f"tokenizer {name!r} has no padding token {pad_token!r}")
        pad_id = eod_id
    return TextTokenizer(tokenizer, eod_id=eod_id, pad_id=pad_id, name=name)


def load_tokenizer(name_or_path: str | os.PathLike, *, eod_token: str | None = None,
                   pad_token: str | None = None) -> TextTokenizer:
    """A Hugging Face tokenizer from a local directory / `tokenizer.json` file, or a hub id (e.g. "gpt2").

    A hub id needs network access and, for gated models (Gemma 3), a Hugging Face token in HF_TOKEN.
    """
    path = pathlib.Path(name_or_path)
    if path.is_dir():
        path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(name_or_path)!r} has no tokenizer.json; save one with `tokenizer.save_pretrained(dir)` "
                "(a fast tokenizer) or pass a hub id"
            )
    if path.is_file():
        try:
            tokenizer = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception with a multi-line message
            problem = " ".join(str(err).split()) or type(err).__name__
            raise ValueError(f"{path}: not a readable tokenizer.json ({problem})") from err
        return wrap_tokenizer(tokenizer, eod_token=eod_token, pad_token=pad_token, name=str(name_or_path))
    name = str(name_or_path)
    try:
        tokenizer = tokenizers.Tokenizer.from_pretrained(name, token=os.environ.get("HF_TOKEN"))
    except Exception as err:  # the hub client raises several unrelated types: explain them together
        raise RuntimeError(
            f"could not load tokenizer {name!r}: it is not a local directory or file, and fetching it from the "
            f"Hugging Face hub failed ({type(err).__name__}: {err}). Check the id, the network, and for gated "
            "models (Gemma 3) accept the licence on the model page and set HF_TOKEN."
        ) from err
    return wrap_tokenizer(tokenizer, eod_token=eod_token, pad_token=pad_token, name=name)


@dataclasses.dataclass(frozen=True)
class BPEConfig:
    """Byte-level BPE training settings (GPT-2 pre-tokenisation: no unknown tokens, any bytes encode)."""

    vocab_size: int = 8192
    min_frequency: int = 2

    def __post_init__(self):
        minimum = 256 + 2  # the byte alphabet plus the end-of-document and padding tokens
        if self.vocab_size < minimum:
            raise ValueError(f"vocab_size={self.vocab_size} is below {minimum} (256 bytes + 2 special tokens)")


DEFAULT_BPE = BPEConfig()


def default_cache_dir() -> pathlib.Path:
    """$PONDERTTT_CACHE, else $XDG_CACHE_HOME/ponderttt, else ~/.cache/ponderttt."""
    if os.environ.get("PONDERTTT_CACHE"):
        return pathlib.Path(os.environ["PONDERTTT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "ponderttt"


def corpus_fingerprint(texts: Iterable[str], config: BPEConfig) -> tuple[str, list[str]]:
    """(hex digest of the training texts and settings, the texts as a list)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([_BPE_FORMAT_VERSION, dataclasses.asdict(config)]).encode())
    kept = []
    for text in texts:
        encoded = text.encode("utf-8", "surrogatepass")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
        kept.append(text)
    return digest.hexdigest(), kept


def _train(texts: Iterator[str] | Sequence[str], config: BPEConfig) -> tokenizers.Tokenizer:
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOD_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_bpe(texts: Iterable[str], config: BPEConfig = BPEConfig(), *,
              cache_dir: str | os.PathLike | None = None) -> TextTokenizer:
    """A byte-level BPE trained on `texts`, cached as `<cache_dir>/tokenizers/bpe-<vocab>-<hash>.json`.

    The cache key hashes every text and the settings: the same corpus gives the same file, any changed
    byte trains again. `cache_dir=None` uses `default_cache_dir()`.
    """
    fingerprint, kept = corpus_fingerprint(texts, config)
    if not kept:
        raise ValueError("train_bpe got no texts: the source (after cleaning and the split) is empty")
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = folder / "tokenizers"
    path = folder / f"bpe-{config.vocab_size}-{fingerprint}.json"
    if path.is_file():
        return wrap_tokenizer(tokenizers.Tokenizer.from_file(str(path)), name=str(path))
    tokenizer = _train(kept, config)
    folder.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees half a file.
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
        handle.write(tokenizer.to_str())
    os.replace(handle.name, path)
    return wrap_tokenizer(tokenizer, name=str(path))
