"""HF fast tokenizers (`tokenizer.json`) with the special-token ids of their directory: `load_hf_tokenizer`."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

import tokenizers

from ponderttt.models.config import AssetError, read_json_object

# Files holding the special tokens, the later one winning.
_SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")


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


def _token_text(value: Any, field: str, file: pathlib.Path) -> str | None:
    """A special token's text: HF stores either the string or an AddedToken object with "content" (None: unset)."""
    text = value.get("content") if isinstance(value, dict) else value
    if text is not None and not isinstance(text, str):
        raise AssetError(file, f"{field}={value!r} is neither a token string nor an object with a string 'content'")
    return text


def load_hf_tokenizer(path: str | pathlib.Path) -> HFTokenizer:
    """The fast tokenizer of a HF directory (or of a tokenizer.json file), with its bos/eos/pad ids.

    The special tokens come from special_tokens_map.json and tokenizer_config.json (the latter wins); an id is None
    when its token is unset or not in the vocabulary. Raises FileNotFoundError without a tokenizer.json, and
    `AssetError` (`<file>: <problem>`, one line) when tokenizer.json is not a tokenizer the `tokenizers` library
    reads, or a special-tokens file is empty, not UTF-8, not a JSON object or gives a token that is not a string.
    """
    folder = pathlib.Path(path)
    file = folder / "tokenizer.json" if folder.is_dir() else folder
    if not file.exists():
        raise FileNotFoundError(f"{folder}: no tokenizer.json (only fast tokenizers are supported)")
    try:
        tok = tokenizers.Tokenizer.from_file(str(file))
    except Exception as err:  # the Rust library raises a bare Exception with serde's message
        raise AssetError(file, f"not a tokenizer.json that the tokenizers library reads ({err})") from err
    texts: dict[str, str | None] = {}
    for name in _SPECIAL_TOKEN_FILES:
        special_file = file.parent / name
        if special_file.exists():
            special = read_json_object(special_file)
            for role in ("bos", "eos", "pad"):
                if special.get(f"{role}_token") is not None:
                    texts[role] = _token_text(special[f"{role}_token"], f"{role}_token", special_file)
    ids = {role: None if text is None else tok.token_to_id(text) for role, text in texts.items()}
    return HFTokenizer(tok, bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=ids.get("pad"))
