"""A byte-level tokenizer (UTF-8 bytes as ids 3..258; 0 pad, 1 bos, 2 eos) for random-weight models: the 'tiny'
test model, and 'random:<architecture>' models whose vocabulary is larger (an id above 258 decodes as the byte
(id - 3) mod 256, so that every generated token of a random model is text a client can see and count)."""

from __future__ import annotations

from typing import Optional, Sequence


class ByteTokenizer:
    """UTF-8 bytes as ids 3..258; 0 pad, 1 bos, 2 eos. Follows dmc_jax.tokenizer.base.Tokenizer."""

    vocab_size = 259
    bos_id: Optional[int] = 1
    eos_id: Optional[int] = 2
    stop_ids: Sequence[int] = (2,)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = [b + 3 for b in text.encode("utf-8")]
        return [self.bos_id] + ids if add_bos else ids

    def decode(self, ids: Sequence[int]) -> str:
        return bytes((i - 3) % 256 for i in ids if i >= 3).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + ("assistant: " if add_generation_prompt
                                                                               else "")
