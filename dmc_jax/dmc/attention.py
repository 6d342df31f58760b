"""DMC's training form of attention: partial accumulations, RoPE at each position, the soft merge mask.

logit(t, j) = q_t . k^_j / sqrt(Dh) + log(1 - alpha_{j+1})   for j < t (causal; the diagonal j = t is exempt)
A key j whose slot was merged into at j + 1 is (softly) hidden from later queries. In hard mode the penalty is a
large negative number where alpha_{j+1} = 1, so attention sees exactly the slots the inference cache keeps.

Shape letters: B batch, T time, S key positions (= T), H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from dmc_jax.dmc.accumulate import accumulate
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.dmc.decisions import decisions, read_channel, sequence_starts, zero_channel
from dmc_jax import kernels

HIDDEN = -1e9  # hard-mode penalty for a merged slot (finite, so a fully hidden row still normalizes)


def penalty_vector(alpha_BTK: jax.Array, z_BTK: jax.Array, dmc: DMCConfig) -> jax.Array:
    """[B, K, S] the penalty of each key j: log(1 - alpha_{j+1}) (0 for the last key, which has no successor)."""
    if dmc.mode == "train":
        # log(1 - sigmoid(z)) = log_sigmoid(-z), stable where alpha ~ 1; forced appends (alpha = 0) give 0.
        log_keep_BTK = jnp.where(alpha_BTK == 0.0, 0.0, jax.nn.log_sigmoid(-z_BTK))
    else:
        log_keep_BTK = jnp.where(alpha_BTK > 0.5, HIDDEN, 0.0)
    next_BTK = jnp.concatenate([log_keep_BTK[:, 1:], jnp.zeros_like(log_keep_BTK[:, :1])], axis=1)
    return next_BTK.transpose(0, 2, 1).astype(jnp.float32)


def merge_penalty(alpha_BTK: jax.Array, z_BTK: jax.Array, dmc: DMCConfig) -> jax.Array:
    """[B, K, T, S] additive logits: the key penalties below the diagonal, 0 on and above it (the XLA form)."""
    T = alpha_BTK.shape[1]
    below_TS = jnp.arange(T)[None, :] < jnp.arange(T)[:, None]
    return jnp.where(below_TS[None, None], penalty_vector(alpha_BTK, z_BTK, dmc)[:, :, None, :], 0.0)


def dmc_core(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, z_BTK, omega_BTK, positions_BT, segment_ids_BT, rope, ch: int,
             dmc: DMCConfig, post_rope_keep=None, return_slots: bool = False):
    """Attention output [B, T, H, Dh] given decisions; q/k pre-RoPE with channel ch already zeroed.

    Channel ch of the rotated q and k is multiplied by post_rope_keep (default: 0 if dmc.zero_after_rope else 1).
    return_slots: also return the rotated partial accumulations (khat_BTKD, vhat_BTKD): the value each slot
    holds after token t, which is what the inference cache stores (prefill builds its cache from them).
    """
    B, T = q_BTHD.shape[:2]
    khat_BTKD, vhat_BTKD = accumulate(alpha_BTK, omega_BTK, (k_BTKD, v_BTKD), dmc.window)
    khat_BTKD = rope(khat_BTKD.astype(k_BTKD.dtype), positions_BT)
    q_BTHD = rope(q_BTHD, positions_BT)
    if post_rope_keep is None and dmc.zero_after_rope:
        khat_BTKD, q_BTHD = zero_channel(khat_BTKD, ch), zero_channel(q_BTHD, ch)
    elif post_rope_keep is not None:
        khat_BTKD = khat_BTKD.at[..., ch].multiply(jnp.asarray(post_rope_keep, khat_BTKD.dtype))
        q_BTHD = q_BTHD.at[..., ch].multiply(jnp.asarray(post_rope_keep, q_BTHD.dtype))
    vhat_BTKD = vhat_BTKD.astype(v_BTKD.dtype)
    # XLA's masked attention with the T x T penalty, or the Pallas flash kernel that never builds it (on GPU).
    out_BTHD = kernels.key_penalty_attention(q_BTHD, khat_BTKD, vhat_BTKD, penalty_vector(alpha_BTK, z_BTK, dmc),
                                             segment_ids_BT, kernels=dmc.kernels)
    return (out_BTHD, khat_BTKD, vhat_BTKD) if return_slots else out_BTHD


@dataclasses.dataclass(frozen=True)
class DMCAttention:
    """The SequenceAttention of a DMC model (llama.forward_aux(..., attention=DMCAttention(dmc), rng=...)).

    active / fade (optional traced scalars) fold the recipe's zero-out stage into the same computation: while
    `active` is False every decision is 'append' and channel ch of q and k is scaled by `fade` instead of read and
    zeroed, which is exactly the vanilla model with a faded channel (so one compiled step serves every stage).

    aux per layer: alpha_st_BTK (straight-through 0/1 decisions for the compression loss), alpha_BTK (what the
    layer used), omega_BTK.
    """

    dmc: DMCConfig
    active: Optional[jax.Array] = None
    fade: Optional[jax.Array] = None

    def __call__(self, layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, rng: Optional[jax.Array]):
        B, T, _, Dh = q_BTHD.shape
        ch = self.dmc.channel(Dh)
        q_in_BTHD, k_in_BTKD = q_BTHD, k_BTKD
        a_BTK, omega_BTK, q_BTHD, k_BTKD = read_channel(q_BTHD, k_BTKD, self.dmc)
        starts_BT = sequence_starts(B, T, segment_ids_BT)
        alpha_BTK, alpha_st_BTK, z_BTK = decisions(a_BTK, starts_BT, self.dmc, rng)
        post_rope_keep = None
        if self.active is not None:
            fade = jnp.float32(1.0) if self.fade is None else self.fade
            keep_ch = jnp.where(self.active, 0.0, fade)  # inactive: faded channel instead of a zeroed one
            q_BTHD = q_in_BTHD.at[..., ch].multiply(keep_ch.astype(q_BTHD.dtype))
            k_BTKD = k_in_BTKD.at[..., ch].multiply(keep_ch.astype(k_BTKD.dtype))
            alpha_BTK = jnp.where(self.active, alpha_BTK, 0.0)
            alpha_st_BTK = jnp.where(self.active, alpha_st_BTK, 0.0)
            # Zeroing after RoPE belongs to DMC, not to the vanilla model that the inactive stage runs.
            post_rope_keep = jnp.where(self.active, 0.0 if self.dmc.zero_after_rope else 1.0, 1.0)
        out_BTHD = dmc_core(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, z_BTK, omega_BTK, positions_BT, segment_ids_BT,
                            rope, ch, self.dmc, post_rope_keep)
        return out_BTHD, {"alpha_st_BTK": alpha_st_BTK, "alpha_BTK": alpha_BTK, "omega_BTK": omega_BTK}
