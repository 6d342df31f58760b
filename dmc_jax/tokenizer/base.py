"""The tokenizer interface every loader returns (GGUF arrays, tokenizer.json, SentencePiece)."""

from __future__ import annotations

from typing import Optional, Protocol, Sequence


class Tokenizer(Protocol):
    """Text <-> token ids. Data pipelines and the CLI depend on this, never on a concrete tokenizer."""

    vocab_size: int
    bos_id: Optional[int]
    eos_id: Optional[int]
    stop_ids: Sequence[int]  # ids that end generation (eos and, for chat models, end-of-turn tokens)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; prepends bos_id when add_bos and the model has one."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids (special tokens dropped)."""
        ...

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """Renders [{'role': ..., 'content': ...}] with the model's own chat template."""
        ...
