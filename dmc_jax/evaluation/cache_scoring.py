"""Log-likelihood of continuations decoded through a compressed cache, with greedy flags and per-row cache stats.

The computation of `forced_decode.prompt_then_decode` with every step forced (task compare's multiple choice) and
of `decode_perplexity.nll_through_cache` (its decoded perplexity, a one-token prompt): right-padded prompts are
prefilled (the method compresses them as its prefill rule says), then the continuation's tokens are fed one by one
with `decode_step`; the score of continuation token i is its log-probability under the logits after the prompt and
tokens < i. Rows are independent; a row's continuation may be shorter than N (the steps after it are not scored).

Shape letters: B rows, T padded prompt length, N padded continuation length, V vocab, L layers, K KV heads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params


@functools.partial(jax.jit, static_argnames=("method", "cfg"))
def score_continuations(params: Params, prompt_BT, lengths_B, cont_BN, cont_len_B, method: CacheMethod,
                        cfg: ModelConfig):
    """(log-prob of each continuation token [B, N], whether it was the argmax [B, N], entries kept [L, B, K] when
        the row's last continuation token was scored, the final cache state).

    Positions past a row's cont_len_B are 0 / False. The kept snapshot is what the cache held for the
    lengths_B + cont_len_B - 1 tokens that the last score saw (later steps do not count).
    """
    B, T = prompt_BT.shape
    N = cont_BN.shape[1]
    state = method.init(cfg, B, T + N)
    logits_BV, state = llama.prefill(params, prompt_BT, lengths_B, state, method, cfg)
    kept_LBK = method.stats(state, lengths_B)["kept_LBK"]

    def step(carry, i):
        state, logits_BV, kept_LBK = carry
        token_B = cont_BN[:, i]
        logp_BV = jax.nn.log_softmax(logits_BV.astype(jnp.float32), axis=-1)
        logp_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
        greedy_B = jnp.argmax(logits_BV, axis=-1) == token_B
        logits_BV, state = llama.decode_step(params, token_B, lengths_B + i, state, method, cfg)
        seen_B = i == cont_len_B - 2  # the cache after this step is the one that scores the last token
        kept_LBK = jnp.where(seen_B[None, :, None], method.stats(state, lengths_B + i + 1)["kept_LBK"], kept_LBK)
        return (state, logits_BV, kept_LBK), (logp_B, greedy_B)

    (state, _, kept_LBK), (logp_NB, greedy_NB) = jax.lax.scan(step, (state, logits_BV, kept_LBK), jnp.arange(N))
    scored_BN = jnp.arange(N)[None] < cont_len_B[:, None]
    return jnp.where(scored_BN, logp_NB.T, 0.0), scored_BN & greedy_NB.T, kept_LBK, state
