"""Perplexity by decoding through a compressed cache: each token sees only what the cache method kept.

Teacher forcing: a short prefix is prefilled (the method compresses it as its prefill rule says), then every
later token is fed with `decode_step` inside one jitted `lax.scan`, and the logits that predicted it are scored.
So the score of token t reflects the method's cache after t tokens (prefill and decode-time eviction), unlike a
full-attention forward pass.

Shape letters: B sequences, T tokens per sequence, N scored positions (T - prefix), V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params


@functools.partial(jax.jit, static_argnames=("method", "cfg", "prefix"))
def nll_through_cache(params: Params, tokens_BT: jax.Array, method: CacheMethod, cfg: ModelConfig, prefix: int):
    """Next-token NLL [B, N] of tokens prefix..T-1, decoding token by token through `method`; and its stats."""
    nll_BN, state = _nll_and_state(params, tokens_BT, method, cfg, prefix)
    return nll_BN, method.stats(state, jnp.full((tokens_BT.shape[0],), tokens_BT.shape[1], jnp.int32))


def _nll_and_state(params: Params, tokens_BT: jax.Array, method: CacheMethod, cfg: ModelConfig, prefix: int):
    B, T = tokens_BT.shape
    state = method.init(cfg, B, T)
    logits_BV, state = llama.prefill(params, tokens_BT[:, :prefix], jnp.full((B,), prefix, jnp.int32), state,
                                     method, cfg)

    def nll(logits_BV, target_B):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), target_B[:, None], axis=-1)[:, 0]

    def step(carry, t):
        state, logits_BV = carry
        token_B = tokens_BT[:, t]
        logits_BV, state = llama.decode_step(params, token_B, jnp.full((B,), t, jnp.int32), state, method, cfg)
        return (state, logits_BV), nll(logits_BV, tokens_BT[:, t + 1])

    first_B = nll(logits_BV, tokens_BT[:, prefix])
    (state, _), rest_NB = jax.lax.scan(step, (state, logits_BV), jnp.arange(prefix, T - 1))
    nll_BN = jnp.concatenate([first_B[:, None], rest_NB.T], axis=1)
    return nll_BN, state


@functools.partial(jax.jit, static_argnames=("method", "cfg", "prefix"))
def _nll_stats_state(params: Params, tokens_BT: jax.Array, method: CacheMethod, cfg: ModelConfig, prefix: int):
    nll_BN, state = _nll_and_state(params, tokens_BT, method, cfg, prefix)
    return nll_BN, method.stats(state, jnp.full((tokens_BT.shape[0],), tokens_BT.shape[1], jnp.int32)), state


@dataclasses.dataclass
class DecodePerplexity:
    perplexity: float
    tokens_scored: int
    sequences: int
    context: int
    prefix: int
    compression_ratio: float     # logical: tokens seen / entries kept at the end, over layers and heads
    bytes_allocated_per_sequence: float
    seconds: float
    overflow: int = 0            # tokens a per-head buffer had no room for (allowed only by on_overflow='evict')


def decode_perplexity(params: Params, rows_NT: np.ndarray, method: CacheMethod, cfg: ModelConfig, prefix: int,
                      batch: int) -> DecodePerplexity:
    """Perplexity of token rows [N, T] decoded through `method` (rows batched `batch` at a time).

    A cache whose per-head buffers ran out of room raises the method's UserError (never a silent number) unless
    its on_overflow allows the fallback; the count is reported either way."""
    import time

    start = time.perf_counter()
    total, scored, crs, nbytes, overflow = 0.0, 0, [], 0.0, 0
    for i in range(0, len(rows_NT), batch):
        chunk = jnp.asarray(rows_NT[i:i + batch])
        nll_BN, stats, state = _nll_stats_state(params, chunk, method, cfg, prefix)
        if hasattr(method, "check"):
            method.check(state)
        if "overflow_LBK" in stats:
            overflow += int(jnp.sum(stats["overflow_LBK"]))
        total += float(jnp.sum(nll_BN))
        scored += int(nll_BN.size)
        kept = float(jnp.sum(stats["kept_LBK"]))
        crs.append(float(jnp.sum(jnp.broadcast_to(stats["tokens_B"][None, :, None], stats["kept_LBK"].shape))) / kept)
        nbytes = float(stats["bytes_allocated"]) / chunk.shape[0]
    return DecodePerplexity(perplexity=math.exp(total / scored), tokens_scored=scored, sequences=len(rows_NT),
                            context=rows_NT.shape[1], prefix=prefix, compression_ratio=float(np.mean(crs)),
                            bytes_allocated_per_sequence=nbytes, seconds=time.perf_counter() - start,
                            overflow=overflow)
