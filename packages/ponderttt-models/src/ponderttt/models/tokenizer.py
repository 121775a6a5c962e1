"""HF fast tokenizers (`tokenizer.json`) with the special-token ids of their directory: `load_hf_tokenizer`."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import tokenizers


@dataclasses.dataclass
class HFTokenizer:
    """A HF `tokenizer.json` with the special tokens of `tokenizer_config.json` / `special_tokens_map.json`."""

    tokenizer: tokenizers.Tokenizer
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (may differ from the model's padded vocab_size)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`, with the tokenizer's post-processor specials (e.g. Gemma's BOS) when asked."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """`encode` of each text (in parallel, by the Rust library); rows are unpadded lists of ids."""
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids` (any ints, e.g. a numpy row), special tokens dropped unless skip_special_tokens=False."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _token_text(value: Any) -> str | None:
    """A special token's text: HF stores either the string or an AddedToken dict with "content"."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_hf_tokenizer(path: str | pathlib.Path) -> HFTokenizer:
    """The fast tokenizer of a HF directory (or of a tokenizer.json file), with its bos/eos/pad ids.

    The special tokens come from special_tokens_map.json and tokenizer_config.json (the latter wins); an id is None
    when its token is unset or not in the vocabulary. Raises FileNotFoundError without a tokenizer.json.
    """
    folder = pathlib.Path(path)
    file = folder / "tokenizer.json" if folder.is_dir() else folder
    if not file.exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
    tok = tokenizers.Tokenizer.from_file(str(file))
    special: dict[str, Any] = {}
    base = file.parent
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (base / name).exists():
            special.update({k: v for k, v in json.loads((base / name).read_text()).items() if v is not None})
    ids = {}
    for role in ("bos", "eos", "pad"):
        text = _token_text(special.get(f"{role}_token"))
        ids[role] = tok.token_to_id(text) if text is not None else None
    return HFTokenizer(tok, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
