"""Prompts through a compressed cache, then N decode steps that either follow given tokens or the greedy choice.

One jitted function serves passkey retrieval (greedy answer) and multiple-choice scoring (log-likelihood of a
given continuation): prefill right-padded prompts with the method (which compresses them), then decode N tokens.
At step i the input is forced_BN[:, i] where force_BN is set, otherwise the argmax of the previous logits.

Shape letters: B rows, T padded prompt length, N decode steps, V vocab.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params


def prompt_then_decode(params: Params, prompt_BT, lengths_B, forced_BN, force_BN, method: CacheMethod,
                       cfg: ModelConfig):
    """Returns (log-prob of each step's input token under the previous logits [B, N], tokens fed [B, N]).

    A cache that ran out of room (a DMC or DMS buffer) raises its UserError instead of returning a number."""
    logp_BN, tokens_BN, state = _prompt_then_decode(params, prompt_BT, lengths_B, forced_BN, force_BN, method, cfg)
    if hasattr(method, "check"):
        method.check(state)
    return logp_BN, tokens_BN


@functools.partial(jax.jit, static_argnames=("method", "cfg"))
def _prompt_then_decode(params: Params, prompt_BT, lengths_B, forced_BN, force_BN, method: CacheMethod,
                        cfg: ModelConfig):
    B, T = prompt_BT.shape
    N = forced_BN.shape[1]
    state = method.init(cfg, B, T + N)
    logits_BV, state = llama.prefill(params, prompt_BT, lengths_B, state, method, cfg)

    def step(carry, i):
        state, logits_BV = carry
        token_B = jnp.where(force_BN[:, i], forced_BN[:, i], jnp.argmax(logits_BV, axis=-1).astype(jnp.int32))
        logp_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), token_B[:, None], axis=-1)[:, 0]
        logits_BV, state = llama.decode_step(params, token_B, lengths_B + i, state, method, cfg)
        return (state, logits_BV), (logp_B, token_B)

    (state, _), (logp_NB, tokens_NB) = jax.lax.scan(step, (state, logits_BV), jnp.arange(N))
    return logp_NB.T, tokens_NB.T, state
