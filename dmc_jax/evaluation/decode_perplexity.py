"""Perplexity by decoding through a compressed cache: each token sees only what the cache method kept.

Teacher forcing: a short prefix is prefilled (the method compresses it as its prefill rule says), then every
later token is decoded through the cache, and the logits that predicted it are scored. So the score of token t
reflects the method's cache after t tokens (prefill and decode-time eviction), unlike a full-attention forward pass.

Two orders of the same computation (fp32 agrees to rounding; bf16 rounds differently, so an eviction policy's
discrete choices can differ and its bf16 perplexity moves by a few tenths of a percent): a method whose state is all
per layer (llama.layers_independent: dense, the eviction policies, DMC padded, DMS) is decoded layer by layer
(llama.decode_forced: every token through layer 0, then layer 1, ...; the matmuls see all tokens at once; ~4x
faster on a CPU); one whose layers share a page pool (paged DMC, paged DMS) token by token with `decode_step` inside
one jitted `lax.scan`, as a server decodes it (which layer takes a page first decides what a full pool forces out).
order='token' decodes every method token by token.

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


ORDERS = ("auto", "token", "layer")


def resolve_order(order: str, method: CacheMethod) -> str:
    """'layer' or 'token': how `order` ('auto' = layer by layer where the method allows it) decodes `method`."""
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}; got {order!r}")
    return "layer" if order == "layer" or (order == "auto" and llama.layers_independent(method)) else "token"


@functools.partial(jax.jit, static_argnames=("method", "cfg", "prefix", "order"))
def nll_through_cache(params: Params, tokens_BT: jax.Array, method: CacheMethod, cfg: ModelConfig, prefix: int,
                      order: str = "auto"):
    """Next-token NLL [B, N] of tokens prefix..T-1, decoded through `method`; and its stats. order: 'auto' (layer by
    layer when the method allows it, the module docstring), 'token' or 'layer' (for tests and benchmarks)."""
    nll_BN, state = _nll_and_state(params, tokens_BT, method, cfg, prefix, order)
    return nll_BN, method.stats(state, jnp.full((tokens_BT.shape[0],), tokens_BT.shape[1], jnp.int32))


def _nll_and_state(params: Params, tokens_BT: jax.Array, method: CacheMethod, cfg: ModelConfig, prefix: int,
                   order: str = "auto"):
    B, T = tokens_BT.shape
    state = method.init(cfg, B, T)
    logits_BV, state = llama.prefill(params, tokens_BT[:, :prefix], jnp.full((B,), prefix, jnp.int32), state,
                                     method, cfg)
    first_B = _nll(logits_BV, tokens_BT[:, prefix])
    if resolve_order(order, method) == "layer":  # llama.decode_forced
        positions_BN = jnp.broadcast_to(jnp.arange(prefix, T - 1, dtype=jnp.int32), (B, T - 1 - prefix))
        x_BND, state = llama.decode_forced(params, tokens_BT[:, prefix:T - 1], positions_BN, state, method, cfg)
        rest_BN = _nll_of_hidden(params, x_BND, tokens_BT[:, prefix + 1:], cfg)
        return jnp.concatenate([first_B[:, None], rest_BN], axis=1), state

    def step(carry, t):  # token by token: a cache whose layers share a page pool
        state, logits_BV = carry
        token_B = tokens_BT[:, t]
        logits_BV, state = llama.decode_step(params, token_B, jnp.full((B,), t, jnp.int32), state, method, cfg)
        return (state, logits_BV), _nll(logits_BV, tokens_BT[:, t + 1])

    (state, _), rest_NB = jax.lax.scan(step, (state, logits_BV), jnp.arange(prefix, T - 1))
    return jnp.concatenate([first_B[:, None], rest_NB.T], axis=1), state


def _nll(logits_BV, target_B):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), target_B[:, None], axis=-1)[:, 0]


def _nll_of_hidden(params: Params, x_BND: jax.Array, targets_BN: jax.Array, cfg: ModelConfig, chunk: int = 128):
    """NLL [B, N] of targets under the logits of hidden states x_BND, `chunk` positions at a time (the logits of
    every position at once would be B x N x V floats: 1.6 GB at 4 x 2,048 tokens of a 49k vocabulary)."""
    B, N, D = x_BND.shape
    if N == 0:
        return jnp.zeros((B, 0), jnp.float32)
    pad = -N % chunk
    x_CBcD = jnp.pad(x_BND, ((0, 0), (0, pad), (0, 0))).reshape(B, -1, chunk, D).swapaxes(0, 1)
    t_CBc = jnp.pad(targets_BN, ((0, 0), (0, pad))).reshape(B, -1, chunk).swapaxes(0, 1)

    def chunk_nll(xt):
        logp_BcV = jax.nn.log_softmax(llama.output_logits(params, xt[0], cfg), axis=-1)
        return -jnp.take_along_axis(logp_BcV, xt[1][..., None], axis=-1)[..., 0]

    nll_CBc = jax.lax.map(chunk_nll, (x_CBcD, t_CBc))
    return nll_CBc.swapaxes(0, 1).reshape(B, -1)[:, :N]


@functools.partial(jax.jit, static_argnames=("method", "cfg", "prefix", "order"))
def _nll_stats_state(params: Params, tokens_BT: jax.Array, method: CacheMethod, cfg: ModelConfig, prefix: int,
                     order: str):
    nll_BN, state = _nll_and_state(params, tokens_BT, method, cfg, prefix, order)
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
    order: str = "token"         # how it was decoded: 'layer' (layer by layer) or 'token' (token by token)


def decode_perplexity(params: Params, rows_NT: np.ndarray, method: CacheMethod, cfg: ModelConfig, prefix: int,
                      batch: int, order: str = "auto") -> DecodePerplexity:
    """Perplexity of token rows [N, T] decoded through `method` (rows batched `batch` at a time); order: one of
    ORDERS (resolve_order).

    A cache whose per-head buffers ran out of room raises the method's UserError (never a silent number) unless
    its on_overflow allows the fallback; the count is reported either way."""
    import time

    order = resolve_order(order, method)
    start = time.perf_counter()
    total, scored, crs, nbytes, overflow = 0.0, 0, [], 0.0, 0
    for i in range(0, len(rows_NT), batch):
        chunk = jnp.asarray(rows_NT[i:i + batch])
        nll_BN, stats, state = _nll_stats_state(params, chunk, method, cfg, prefix, order)
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
                            overflow=overflow, order=order)
