"""DMC's decision and importance, read from one key/query channel (no new parameters).

a_t = k_t[ch] - c (per KV head), omega_t = sigmoid(mean over the group's query heads of q_t[ch] + c) + eps; then
channel ch of q and k is zeroed so it no longer contributes to q.k. The first token of a sequence (and of every
packed segment) always appends.

Shape letters: B batch, T time, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dmc_jax.dmc.config import DMCConfig


def read_channel(q_BTHD: jax.Array, k_BTKD: jax.Array, dmc: DMCConfig):
    """(a_BTK decision logits, omega_BTK importance, q with ch zeroed, k with ch zeroed); a and omega in fp32."""
    B, T, H, Dh = q_BTHD.shape
    K = k_BTKD.shape[2]
    ch = dmc.channel(Dh)
    a_BTK = k_BTKD[..., ch].astype(jnp.float32) - dmc.decision_offset
    q_ch_BTK = q_BTHD[..., ch].astype(jnp.float32).reshape(B, T, K, H // K).mean(-1)
    omega_BTK = jax.nn.sigmoid(q_ch_BTK + dmc.decision_offset) + dmc.importance_eps
    return a_BTK, omega_BTK, zero_channel(q_BTHD, ch), zero_channel(k_BTKD, ch)


def zero_channel(x_BTND: jax.Array, ch: int) -> jax.Array:
    return x_BTND.at[..., ch].set(0)


def sequence_starts(B: int, T: int, segment_ids_BT: Optional[jax.Array]) -> jax.Array:
    """[B, T] True where a token starts a sequence or a packed segment (it must append)."""
    first_BT = jnp.broadcast_to(jnp.arange(T) == 0, (B, T))
    if segment_ids_BT is None:
        return first_BT
    changed_BT = jnp.concatenate([jnp.zeros((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    return first_BT | changed_BT


def decisions(a_BTK: jax.Array, starts_BT: jax.Array, dmc: DMCConfig, rng: Optional[jax.Array]):
    """(alpha_BTK used by accumulation and the mask, alpha_st_BTK straight-through 0/1 for the loss, z_BTK logits).

    train: alpha is the relaxed sample sigmoid((a + u) / tau), u logistic noise; hard: alpha is the 0/1 decision
    with a straight-through gradient (identical to alpha_st); append: alpha = 0. z = (a + u) / tau in train mode
    and a / tau otherwise; log(1 - alpha) = log_sigmoid(-z) is what the soft mask uses.
    """
    z_BTK = a_BTK / dmc.temperature
    if dmc.mode == "train":
        if rng is None:
            raise ValueError("DMC train mode needs an rng for the Gumbel noise")
        u_BTK = jax.random.logistic(rng, a_BTK.shape, jnp.float32)
        z_BTK = (a_BTK + u_BTK) / dmc.temperature
    soft_BTK = jax.nn.sigmoid(z_BTK)
    hard_BTK = (z_BTK > 0).astype(jnp.float32)
    keep_BT1 = ~starts_BT[..., None]
    alpha_st_BTK = jnp.where(keep_BT1, hard_BTK + soft_BTK - jax.lax.stop_gradient(soft_BTK), 0.0)
    if dmc.mode == "train":
        alpha_BTK = jnp.where(keep_BT1, soft_BTK, 0.0)
    elif dmc.mode == "hard":
        alpha_BTK = alpha_st_BTK
    else:
        alpha_BTK = jnp.zeros_like(a_BTK)
        alpha_st_BTK = alpha_BTK
    return alpha_BTK, alpha_st_BTK, z_BTK
