"""A SentencePiece `tokenizer.model` (Llama 2 style: bos=1, eos=2) behind our Tokenizer protocol.

Control-token strings in the text (`<s>`, `</s>`, ...) encode to their ids, as transformers' Llama
tokenizer does (each text chunk between them is encoded on its own); decode drops control tokens.
"""

from __future__ import annotations

import os
import re
from typing import Iterable, Optional, Sequence

from dmc_jax.errors import UserError
from dmc_jax.tokenizer.chat_template import render_chat
from dmc_jax.tokenizer.hf_tokenizer import check_ids, stop_ids_for


class SPTokenizer:
    """Tokenizer protocol over a sentencepiece.SentencePieceProcessor."""

    def __init__(self, sp, chat_template: Optional[str] = None, extra_stop_ids: Iterable[int] = (),
                 name: str = "tokenizer.model"):
        self.sp = sp
        self.name = name
        self.vocab_size = sp.get_piece_size()
        self.bos_id = sp.bos_id() if sp.bos_id() >= 0 else None
        self.eos_id = sp.eos_id() if sp.eos_id() >= 0 else None
        self.chat_template = chat_template
        self._control = {i for i in range(self.vocab_size) if sp.is_control(i)}
        specials = {sp.id_to_piece(i): i for i in self._control}
        self.stop_ids = stop_ids_for(self.eos_id, specials, extra_stop_ids)
        pattern = "|".join(re.escape(p) for p in sorted(specials, key=len, reverse=True) if p)
        self._special_re = re.compile(f"({pattern})") if pattern else None
        self._specials = specials

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text (control-token strings map to their ids); bos first when add_bos."""
        if not isinstance(text, str):
            raise UserError(f"encode expects a string, got {type(text).__name__}")
        chunks = self._special_re.split(text) if self._special_re else [text]
        ids = [self.bos_id] if add_bos and self.bos_id is not None else []
        for k, chunk in enumerate(chunks):
            if k % 2:  # split() puts the captured special tokens at odd positions
                ids.append(self._specials[chunk])
            elif chunk:
                ids.extend(self.sp.encode(chunk))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, control tokens dropped."""
        return self.sp.decode([i for i in check_ids(ids, self.vocab_size) if i not in self._control])

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt the model's own chat template renders for messages."""
        bos = self.sp.id_to_piece(self.bos_id) if self.bos_id is not None else None
        eos = self.sp.id_to_piece(self.eos_id) if self.eos_id is not None else None
        return render_chat(self.chat_template, messages, add_generation_prompt, bos, eos)


def load_sp_tokenizer(path: str, chat_template: Optional[str] = None,
                      extra_stop_ids: Iterable[int] = ()) -> SPTokenizer:
    """SPTokenizer from a SentencePiece model file; UserError when missing or not a SentencePiece model."""
    import sentencepiece

    if not os.path.isfile(path):
        raise UserError(f"SentencePiece model {path} does not exist; check the path")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.load(path)
    except (OSError, RuntimeError) as e:
        raise UserError(f"{path} is not a SentencePiece model ({' '.join(str(e).split())}); re-download it") \
            from None
    extra = [i for i in extra_stop_ids if i is not None and 0 <= i < sp.get_piece_size()]
    return SPTokenizer(sp, chat_template, extra, name=path)
