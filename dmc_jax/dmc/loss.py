"""DMC's compression objective and schedule (docs/methods/dmc.md).

l_CR = mean over sequences b of max(0, (1 - 1/CR_target) - alpha_bar_b), alpha_bar_b the mean straight-through
decision over layers, KV heads and (real) time steps: one-sided, compressing beyond the target is free.
The target rises linearly from 1 to CR* over the retrofit stage and holds during fine-tuning; the zero-out stage
before it has target 1. Logged CR = 1 / (1 - mean alpha).

Shape letters: L layers, B batch, T time, K KV heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def target_cr(step: jax.Array, final_cr: float, zero_out_steps: int, retrofit_steps: int) -> jax.Array:
    """1 during zero-out, then linear from 1 (at the first retrofit step) to final_cr (at its last), then final_cr."""
    progress = (step.astype(jnp.float32) - zero_out_steps) / max(retrofit_steps - 1, 1)
    return 1.0 + (final_cr - 1.0) * jnp.clip(progress, 0.0, 1.0)


def mean_decisions(alpha_LBTK: jax.Array, valid_BT: jax.Array) -> jax.Array:
    """alpha_bar_B: mean decision per sequence over layers, KV heads and valid time steps."""
    w_BT = valid_BT.astype(jnp.float32)
    per_BT = alpha_LBTK.mean(axis=(0, 3))
    return (per_BT * w_BT).sum(-1) / jnp.maximum(w_BT.sum(-1), 1.0)


def compression_loss(alpha_LBTK: jax.Array, valid_BT: jax.Array, cr_target: jax.Array) -> jax.Array:
    """The one-sided compression loss l_CR (scalar)."""
    alpha_bar_B = mean_decisions(alpha_LBTK, valid_BT)
    return jnp.mean(jax.nn.relu((1.0 - 1.0 / cr_target) - alpha_bar_B))


def compression_ratio(mean_alpha: jax.Array) -> jax.Array:
    """Tokens per kept slot implied by a mean merge rate: 1 / (1 - mean alpha)."""
    return 1.0 / jnp.maximum(1.0 - mean_alpha, 1e-6)


def decision_stats(alpha_LBTK: jax.Array, valid_BT: jax.Array) -> dict:
    """Mean merge rate overall, per layer [L] and per layer x KV head [L, K] over valid tokens."""
    w_BT = valid_BT.astype(jnp.float32)
    n = jnp.maximum(w_BT.sum(), 1.0)
    per_LK = jnp.einsum("lbtk,bt->lk", alpha_LBTK, w_BT) / n
    return {"alpha_mean": per_LK.mean(), "alpha_layer": per_LK.mean(-1), "alpha_layer_head": per_LK}
