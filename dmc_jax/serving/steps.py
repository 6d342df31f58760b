"""The engine's jitted programs over a fixed-size cache of R rows (the cache state is donated to each).

    prefill_row:  a new prompt into one row (freed first), its first token sampled; the other rows untouched
    decode_rows:  ONE decode step of every row; rows not in use decode a pad token at position 1 (an idle row:
                  the paged cache writes nothing for it) and their token is discarded
    free_row:     a finished row's storage back (the paged cache returns its pages to the pool)

Sampling parameters are per-row arrays, so no request recompiles anything: prefill compiles once per prompt
bucket, decode once. Each returns the pool's free pages (-1 for a method without a pool).

Shape letters: R rows, T padded prompt length, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig


def sample_rows(logits_RV, temperature_R, top_k_R, top_p_R, seed_R, counter_R):
    """Next token per row: greedy where temperature is 0, else top-k / top-p sampling with the row's own key
    (fold_in(seed, counter)), so a row's draw never depends on the other rows."""
    greedy_R = jnp.argmax(logits_RV, axis=-1).astype(jnp.int32)

    def sampled(_):
        V = logits_RV.shape[-1]
        x_RV = logits_RV.astype(jnp.float32) / jnp.maximum(temperature_R, 1e-6)[:, None]
        sorted_RV = -jnp.sort(-x_RV, axis=-1)
        rank_V = jnp.arange(V)[None]
        in_k_RV = (top_k_R[:, None] <= 0) | (rank_V < top_k_R[:, None])
        sorted_RV = jnp.where(in_k_RV, sorted_RV, -jnp.inf)
        probs_RV = jax.nn.softmax(sorted_RV, axis=-1)
        # nucleus: keep the smallest prefix whose mass reaches top_p (a token stays if the mass before it < top_p)
        keep_RV = in_k_RV & ((jnp.cumsum(probs_RV, axis=-1) - probs_RV) < top_p_R[:, None])
        cutoff_R1 = jnp.min(jnp.where(keep_RV, sorted_RV, jnp.inf), axis=-1, keepdims=True)
        x_RV = jnp.where(x_RV < cutoff_R1, -jnp.inf, x_RV)
        keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.PRNGKey(s), c))(seed_R, counter_R)
        drawn_R = jax.vmap(lambda k, x: jax.random.categorical(k, x))(keys, x_RV).astype(jnp.int32)
        return jnp.where(temperature_R > 0, drawn_R, greedy_R)

    return jax.lax.cond(jnp.any(temperature_R > 0), sampled, lambda _: greedy_R, None)


def _pages_free(method, state):
    """The pool's free pages (a method with shared leaves reports `pages_free` in its stats), else -1."""
    if not getattr(getattr(method, "layout", None), "shared", ()):
        return jnp.int32(-1)
    return jnp.asarray(method.stats(state, jnp.zeros((1,), jnp.int32)).get("pages_free", -1), jnp.int32)


@functools.partial(jax.jit, static_argnames=("method", "cfg"), donate_argnames=("state",))
def prefill_row(params, tokens_1T, length_1, row_1, state, sampling, method: CacheMethod, cfg: ModelConfig):
    """Frees row row_1, prefills the prompt there; returns (first token [1], state, slots lost [], free pages [])."""
    sub = method.take_rows(state, row_1)
    sub = method.free_rows(sub, jnp.ones((1,), bool))
    logits_1V, sub = llama.prefill(params, tokens_1T, length_1, sub, method, cfg)
    lost = method.stats(sub, length_1).get("overflow_LBK")
    lost = jnp.sum(lost) if lost is not None else jnp.int32(0)
    state = method.put_rows(state, sub, row_1)
    return sample_rows(logits_1V, *sampling), state, lost, _pages_free(method, state)


@functools.partial(jax.jit, static_argnames=("method", "cfg"), donate_argnames=("state",))
def decode_rows(params, tokens_R, positions_R, active_R, state, sampling, method: CacheMethod, cfg: ModelConfig):
    """One decode step of every row; returns (next tokens [R] (0 where inactive), state, free pages [])."""
    positions_R = jnp.where(active_R, positions_R, 1)
    logits_RV, state = llama.decode_step(params, jnp.where(active_R, tokens_R, 0), positions_R, state, method, cfg)
    next_R = jnp.where(active_R, sample_rows(logits_RV, *sampling), 0)
    return next_R, state, _pages_free(method, state)


@functools.partial(jax.jit, static_argnames=("method",), donate_argnames=("state",))
def free_row(state, row_1, method: CacheMethod):
    """Empties row row_1 (its pages back to the pool); returns (state, free pages [])."""
    sub = method.free_rows(method.take_rows(state, row_1), jnp.ones((1,), bool))
    state = method.put_rows(state, sub, row_1)
    return state, _pages_free(method, state)
