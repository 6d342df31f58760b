"""A `tokenizers.Tokenizer` behind our Tokenizer protocol; loads Hugging Face tokenizer.json directories.

GGUF tokenizers (gguf_tokenizer.py) build the same `tokenizers.Tokenizer` and reuse HFTokenizer.
Special tokens written in the text (e.g. `<|im_start|>` from a chat template) encode to their ids, as in
transformers; decode drops them.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

from dmc_jax.errors import UserError
from dmc_jax.tokenizer.chat_template import render_chat

# chat end-of-turn tokens that stop generation along with eos (SmolLM2/ChatML, Llama 3, Gemma, Phi)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>")


def stop_ids_for(eos_id: Optional[int], special_ids: dict, extra: Iterable[int] = ()) -> tuple:
    """eos first, then the end-of-turn special tokens ({token: id}) this vocabulary has, then extra ids."""
    ids = [eos_id] if eos_id is not None else []
    ids += [special_ids.get(t) for t in END_OF_TURN]
    ids += list(extra)
    out = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return tuple(out)


def check_ids(ids: Sequence[int], vocab_size: int) -> list:
    """ids as a list of ints; UserError naming the first id outside [0, vocab_size)."""
    ids = [int(i) for i in ids]
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise UserError(f"token id {bad} is outside the tokenizer's vocabulary [0, {vocab_size})")
    return ids


class HFTokenizer:
    """Tokenizer protocol over a `tokenizers.Tokenizer`, with the model's bos/eos and chat template."""

    def __init__(self, tok, bos_token: Optional[str] = None, eos_token: Optional[str] = None,
                 chat_template: Optional[str] = None, extra_stop_ids: Iterable[int] = (), name: str = "tokenizer"):
        self.tok = tok
        self.name = name
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = self._id(bos_token)
        self.eos_id = self._id(eos_token)
        self.chat_template = chat_template
        specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
        self.stop_ids = stop_ids_for(self.eos_id, specials, extra_stop_ids)

    def _id(self, token: Optional[str]) -> Optional[int]:
        if token is None:
            return None
        i = self.tok.token_to_id(token)
        if i is None:
            raise UserError(f"{self.name}: special token {token!r} is not in the vocabulary; fix the tokenizer config")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text (special-token strings in it map to their ids); bos first when add_bos."""
        if not isinstance(text, str):
            raise UserError(f"encode expects a string, got {type(text).__name__}")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if add_bos and self.bos_id is not None else ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens dropped."""
        return self.tok.decode(check_ids(ids, self.vocab_size), skip_special_tokens=True)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The prompt the model's own chat template renders for messages."""
        return render_chat(self.chat_template, messages, add_generation_prompt, self.bos_token, self.eos_token)

    def to_files(self) -> dict:
        """{'tokenizer.json': ..., 'tokenizer_config.json': ...} for a Hugging Face directory (save_hf_dir)."""
        config = {"bos_token": self.bos_token, "eos_token": self.eos_token, "add_bos_token": False,
                  "clean_up_tokenization_spaces": False, "tokenizer_class": "PreTrainedTokenizerFast",
                  "model_max_length": 1 << 30}
        if self.chat_template:
            config["chat_template"] = self.chat_template
        return {"tokenizer.json": self.tok.to_str(), "tokenizer_config.json": json.dumps(config, indent=2)}


def _token_str(value) -> Optional[str]:
    """tokenizer_config.json writes special tokens as strings or {'content': ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    from dmc_jax.user_files import read_json

    if not os.path.exists(path):
        return {}
    data = read_json(path, "tokenizer file")
    return data if isinstance(data, dict) else {}


def chat_template_of(directory: str, config: dict) -> Optional[str]:
    """The chat template of a HF directory: chat_template.jinja, chat_template.json or tokenizer_config.json."""
    jinja_path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(jinja_path):
        from dmc_jax.user_files import read_text

        return read_text(jinja_path, "chat template")
    template = _read_json(os.path.join(directory, "chat_template.json")).get("chat_template")
    template = template or config.get("chat_template")
    if isinstance(template, list):  # [{'name': 'default', 'template': ...}, {'name': 'tool_use', ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def special_tokens_of(directory: str) -> tuple:
    """(tokenizer_config dict, bos string, eos string, extra stop ids from generation_config/config.json)."""
    config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    special = _read_json(os.path.join(directory, "special_tokens_map.json"))
    bos = _token_str(config.get("bos_token")) or _token_str(special.get("bos_token"))
    eos = _token_str(config.get("eos_token")) or _token_str(special.get("eos_token"))
    extra = []
    for name in ("generation_config.json", "config.json"):
        value = _read_json(os.path.join(directory, name)).get("eos_token_id")
        extra += value if isinstance(value, list) else [value] if isinstance(value, int) else []
    return config, bos, eos, extra


def load_hf_tokenizer(directory: str) -> HFTokenizer:
    """HFTokenizer from a directory's tokenizer.json (+ tokenizer_config.json for specials and chat template)."""
    from tokenizers import Tokenizer

    path = os.path.join(directory, "tokenizer.json")
    if not os.path.exists(path):
        raise UserError(f"{directory} has no tokenizer.json; copy the model's tokenizer files into it")
    try:
        tok = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{path} is not a valid tokenizer.json ({' '.join(str(e).split())}); re-download it") \
            from None
    config, bos, eos, extra = special_tokens_of(directory)
    return HFTokenizer(tok, bos, eos, chat_template_of(directory, config),
                       extra_stop_ids=[i for i in extra if 0 <= i < tok.get_vocab_size(True)], name=path)
