"""DMS's training form of attention: the delayed-eviction additive mask.

Key j carries the decision made at token j + 1 (alpha_{j+1}: evict j). Query t sees key j (j <= t) unpenalized
while t - j <= w; afterwards the logit gets log(1 - alpha_{j+1}) (soft, train mode) or a large negative number
where alpha_{j+1} = 1 (hard mode: exactly the keys the inference cache still holds).

Shape letters: B batch, T query time, S key positions (= T), K KV heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

HIDDEN = -1e9  # hard-mode penalty of an evicted key (finite: a fully hidden row still normalizes)


def eviction_penalty(alpha_BTK: jax.Array, z_BTK: jax.Array, hard: bool) -> jax.Array:
    """[B, K, S] the penalty of each key j once it left the window: log(1 - alpha_{j+1}); 0 for the last key."""
    if hard:
        log_keep_BTK = jnp.where(alpha_BTK > 0.5, HIDDEN, 0.0)
    else:  # log(1 - sigmoid(z)) = log_sigmoid(-z), stable where alpha ~ 1; forced zeros (segment starts) give 0
        log_keep_BTK = jnp.where(alpha_BTK == 0.0, 0.0, jax.nn.log_sigmoid(-z_BTK))
    next_BTK = jnp.concatenate([log_keep_BTK[:, 1:], jnp.zeros_like(log_keep_BTK[:, :1])], axis=1)
    return next_BTK.transpose(0, 2, 1).astype(jnp.float32)


def delayed_eviction_bias(penalty_BKS: jax.Array, window: int) -> jax.Array:
    """[B, K, T, S] additive logits: key j's penalty for queries t with t - j > window, 0 elsewhere."""
    S = penalty_BKS.shape[-1]
    t_T1, s_1S = jnp.arange(S)[:, None], jnp.arange(S)[None, :]
    expired_TS = t_T1 - s_1S > window
    return jnp.where(expired_TS[None, None], penalty_BKS[:, :, None, :], 0.0)
