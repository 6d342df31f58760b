"""Renders a model's own Jinja chat template (GGUF tokenizer.chat_template or tokenizer_config.json).

The environment follows what Hugging Face chat templates expect: a sandbox, trim_blocks/lstrip_blocks,
loop controls, `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII text.
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Optional, Sequence

from dmc_jax.errors import UserError


def _raise(message):
    raise UserError(f"the chat template refused the messages: {message}")


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False):
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


@functools.lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template does not parse ({e}); fix chat_template") from None


def check_messages(messages: Sequence[dict]) -> list:
    """The messages as a list of dicts with string 'role' and 'content'; UserError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise UserError("chat messages must be a list of {'role': ..., 'content': ...} dicts")
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UserError(f"chat message {k} must be a dict with string 'role' and 'content', got {m!r:.80}")
    return list(messages)


def render_chat(template: Optional[str], messages: Sequence[dict], add_generation_prompt: bool = True,
                bos_token: Optional[str] = None, eos_token: Optional[str] = None, **extra) -> str:
    """The prompt text template renders for messages; UserError when the model has no template."""
    if not template:
        raise UserError("this tokenizer has no chat template; use a plain prompt or a chat (instruct) model "
                        "whose tokenizer carries chat_template")
    import jinja2

    try:
        return _compile(template).render(messages=check_messages(messages),
                                         add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except jinja2.TemplateError as e:
        raise UserError(f"the model's chat template failed on these messages ({e})") from None
