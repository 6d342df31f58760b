"""DMS eviction decisions: read from one query channel of the first query head of each KV group, or from the
model's decision adapter (dms/config.py says which).

Shape letters: B batch, T time, H query heads, K KV heads, G = H / K, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dmc_jax.dmc.config import DMCConfig
from dmc_jax.dmc.decisions import decisions as gumbel_decisions
from dmc_jax.dms.config import DMSConfig
from dmc_jax.errors import UserError


def read_decision(q_BTHD: jax.Array, num_kv_heads: int, dms: DMSConfig, adapter_BTK: Optional[jax.Array] = None):
    """(a_BTK decision logits in fp32, q as attention uses it). q_channel: channel ch of each group's first head,
    zeroed in q. adapter: the adapter's raw logits adapter_BTK (llama.py computes them) scaled and offset; q as is."""
    if dms.decision == "adapter":
        if adapter_BTK is None:
            raise UserError("dms.decision='adapter' but the model has no DMS adapter (params['layers']"
                            "['dms_adapter']); load a DMS adapter checkpoint or use dms.decision='q_channel'")
        return adapter_BTK.astype(jnp.float32) * dms.decision_scale - dms.decision_offset, q_BTHD
    G = q_BTHD.shape[2] // num_kv_heads
    ch = dms.channel(q_BTHD.shape[-1])
    a_BTK = q_BTHD[:, :, ::G, ch].astype(jnp.float32) * dms.decision_scale - dms.decision_offset
    return a_BTK, zero_decision_heads(q_BTHD, num_kv_heads, ch)


def zero_decision_heads(q_HD: jax.Array, num_kv_heads: int, ch: int) -> jax.Array:
    """q ([..., H, Dh]: a sequence or one token per row) with channel ch of each group's first head zeroed."""
    G = q_HD.shape[-2] // num_kv_heads
    return q_HD.at[..., ::G, ch].set(0)


def decisions(a_BTK: jax.Array, starts_BT: jax.Array, dms: DMSConfig, rng: Optional[jax.Array]):
    """(alpha_BTK for the mask, alpha_st_BTK straight-through 0/1 for the loss, z_BTK logits); alpha_t marks t - 1.

    The Gumbel-sigmoid relaxation is DMC's (dmc/decisions.py): logistic noise (the difference of two Gumbels), tau,
    a hard threshold at 0 and a straight-through gradient; the first token of a sequence or packed segment marks
    nothing (it has no predecessor in its segment).
    """
    mode = {"train": "train", "hard": "hard", "keep": "append"}[dms.mode]
    return gumbel_decisions(a_BTK, starts_BT, DMCConfig(temperature=dms.temperature, mode=mode), rng)
