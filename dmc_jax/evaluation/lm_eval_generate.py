"""generate_until for the lm-eval backend: prompts prefilled through the cache method, then generated through it.

Requests are grouped by generation settings and cache method and run `batch_size` at a time with
`inference.generate` (prefill, then a while_loop decode that stops when every row produced a stop token); the text
is cut at the first of the request's `until` strings. Greedy unless gen_kwargs ask for sampling.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache.protocol import state_bytes
from dmc_jax.errors import UserError
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.inference.sampling import SamplingConfig

log = logging.getLogger(__name__)
KNOWN = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")


def _settings(gen_kwargs: dict, default_max: int) -> tuple:
    """(stop strings, max new tokens, SamplingConfig) of a request's gen_kwargs."""
    extra = sorted(set(gen_kwargs) - set(KNOWN))
    if extra:
        log.warning("dmc_jax generate_until ignores gen_kwargs %s", extra)
    until = gen_kwargs.get("until") or []
    until = (until,) if isinstance(until, str) else tuple(until)
    sample = bool(gen_kwargs.get("do_sample", False))
    temperature = float(gen_kwargs.get("temperature", 1.0 if sample else 0.0)) if sample else 0.0
    sampling = SamplingConfig(temperature=temperature, top_k=int(gen_kwargs.get("top_k") or 0) if sample else 0,
                              top_p=float(gen_kwargs.get("top_p") or 1.0) if sample else 1.0)
    max_new = int(gen_kwargs.get("max_gen_toks", default_max))
    if max_new < 1:
        raise UserError(f"generate_until: max_gen_toks={max_new} must be >= 1")
    return until, max_new, sampling


def _cut(text: str, until) -> str:
    for stop in until:
        if stop and stop in text:
            text = text[:text.index(stop)]
    return text


def generate_requests(lm, requests: list[tuple[str, dict]]) -> list[str]:
    """Texts generated for lm-eval's (context, gen_kwargs) requests by the backend `lm` (a DmcJaxLM)."""
    model, tok = lm.model, lm.tokenizer
    groups = defaultdict(list)
    for i, (context, gen_kwargs) in enumerate(requests):
        until, max_new, sampling = _settings(dict(gen_kwargs or {}), lm.max_gen_toks)
        if max_new >= lm.max_length:
            raise UserError(f"generate_until: max_gen_toks={max_new} leaves no room for a prompt within "
                            f"max_length={lm.max_length}")
        ids = (lm.tok_encode(context) if context else [])[-(lm.max_length - max_new):] or [lm.prefix_token_id]
        method = lm.loaded.method_for(len(ids))
        groups[(max_new, sampling, method)].append((i, ids, until))
    out: list = [None] * len(requests)
    for (max_new, sampling, method), rows in groups.items():
        rows.sort(key=lambda r: -len(r[1]))
        gen = GenerateConfig(max_new_tokens=max_new, sampling=sampling, stop_ids=tuple(tok.stop_ids), pad_id=0)
        for s in range(0, len(rows), lm.batch_size):
            chunk = rows[s:s + lm.batch_size]
            prompts = [ids for _, ids, _ in chunk] + [[lm.prefix_token_id]] * (lm.batch_size - len(chunk))
            lm.rng, key = jax.random.split(lm.rng)
            result = generate(model.params, prompts, model.cfg, method, gen, key)
            kept_LBK = np.asarray(method.stats(result.state, jnp.asarray(result.lengths))["kept_LBK"])
            per_seq = state_bytes(result.state) / len(prompts)
            for b, (i, ids, until) in enumerate(chunk):
                tokens = [t for t in result.tokens[b] if t not in tok.stop_ids]
                out[i] = _cut(tok.decode(tokens), until)
                lm.meter.add("generate_until", int(result.lengths[b]), float(kept_LBK[:, b].sum()),
                             kept_LBK.shape[0] * kept_LBK.shape[2], per_seq)
    return out
