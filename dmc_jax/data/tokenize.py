"""Documents to token ids: the one place that decides which ids a document contributes (bos / eos included)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.tokenizer.base import Tokenizer

_PROBE = "Probe: The quick brown fox, 1234567890 jumps over the lazy dog. Ünïcödé ✓ 中文 \n\t end."


@dataclasses.dataclass(frozen=True)
class DocumentTokens:
    """Callable: a document (text, or a TFDS example holding it under text_key) -> its ids, int32 [N]."""

    tokenizer: Any
    add_bos: bool = False
    add_eos: bool = True
    text_key: str = "text"

    def __post_init__(self):
        for flag, attr in ((self.add_bos, "bos_id"), (self.add_eos, "eos_id")):
            if flag and getattr(self.tokenizer, attr, None) is None:
                raise UserError(f"data.add_{attr[:3]} is True but the tokenizer has no {attr}; set "
                                f"data.add_{attr[:3]}=False")

    def ids(self, text: str) -> list[int]:
        """Token ids of one document's text, with the configured bos / eos."""
        ids = self.tokenizer.encode(text)
        if self.add_bos:
            ids = [self.tokenizer.bos_id] + ids
        if self.add_eos:
            ids = ids + [self.tokenizer.eos_id]
        return ids

    def __call__(self, example) -> dict:
        return {"tokens": np.asarray(self.ids(document_text(example, self.text_key)), dtype=np.int32)}


def document_text(example, text_key: str = "text") -> str:
    """The text of a raw document: a str, UTF-8 bytes, or a dict holding either under text_key."""
    if isinstance(example, dict):
        if text_key not in example:
            raise UserError(f"data.text_key {text_key!r} is not a feature of this dataset (features: "
                            f"{sorted(example)}); set data.text_key to the text feature")
        example = example[text_key]
    if isinstance(example, np.ndarray) and example.ndim == 0:
        example = example.item()
    if isinstance(example, bytes):
        return example.decode("utf-8", errors="replace")
    if isinstance(example, str):
        return example
    raise UserError(f"data.text_key must name a text feature, got a {type(example).__name__}")


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short tag that changes when the tokenizer's behaviour does (vocab size, special ids, a probe encoding)."""
    probe = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tuple(tokenizer.encode(_PROBE)))
    return f"{type(tokenizer).__name__.lower()}_{hashlib.blake2b(repr(probe).encode(), digest_size=6).hexdigest()}"
