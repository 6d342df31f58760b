"""The zero-out stage of the DMC recipe: fade the decision channel out, then zero the weights that produce it.

Stage 1 runs the vanilla model while channel ch of q and k is scaled by a factor going linearly from 1 to 0;
then the columns of W_q and W_k that produce channel ch are set to 0, so stage 2 starts with a_t = -c (nearly
always append) and omega_t = sigmoid(c) + eps, and the model is, to start with, the one stage 1 left.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from dmc_jax.dmc.config import DMCConfig
from dmc_jax.model.llama import causal_attention
from dmc_jax.model.params import Params


def zero_decision_rows(params: Params, dmc: DMCConfig) -> Params:
    """params with W_q[..., ch] and W_k[..., ch] (stacked layout [L, D, N, Dh]) set to 0."""
    layers = dict(params["layers"])
    ch = dmc.channel(layers["q"].shape[-1])
    layers["q"] = jnp.asarray(layers["q"]).at[..., ch].set(0)
    layers["k"] = jnp.asarray(layers["k"]).at[..., ch].set(0)
    return {**params, "layers": layers}


def fade_factor(step: jax.Array, zero_out_steps: int) -> jax.Array:
    """1 at step 0, 0 from step zero_out_steps on (linear)."""
    return jnp.clip(1.0 - step.astype(jnp.float32) / max(zero_out_steps, 1), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class FadedChannelAttention:
    """Vanilla causal attention with channel ch of q and k multiplied by `factor` (a traced scalar, or a float when
    the attention must be hashable, e.g. a jit static argument)."""

    dmc: DMCConfig
    factor: jax.Array | float

    def __call__(self, layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, rng: Optional[jax.Array]):
        ch = self.dmc.channel(q_BTHD.shape[-1])
        q_BTHD = q_BTHD.at[..., ch].multiply(jnp.asarray(self.factor, q_BTHD.dtype))
        k_BTKD = k_BTKD.at[..., ch].multiply(jnp.asarray(self.factor, k_BTKD.dtype))
        return causal_attention(layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, rng)
