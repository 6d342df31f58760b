"""DMSAttention: the SequenceAttention of a DMS model (training, perplexity, the no-cache oracle).

Shape letters: B batch, T time, S key positions, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from dmc_jax.dmc.decisions import sequence_starts
from dmc_jax.dms.config import DMSConfig
from dmc_jax.dms.decisions import decisions, read_decision, zero_decision_heads
from dmc_jax.dms.mask import delayed_eviction_bias, eviction_penalty
from dmc_jax.model.attention import causal_mask, grouped_attention


def dms_core(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, z_BTK, positions_BT, segment_ids_BT, rope, dms: DMSConfig):
    """Attention output [B, T, H, Dh] under decisions alpha; q pre-RoPE with the decision channel (if any) zeroed."""
    B, T, _, Dh = q_BTHD.shape
    K = k_BTKD.shape[2]
    q_BTHD, k_BTKD = rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT)
    if dms.zeroes_q_after_rope:
        q_BTHD = zero_decision_heads(q_BTHD, K, dms.channel(Dh))
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask_B1TS = causal_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
    bias_BKTS = delayed_eviction_bias(eviction_penalty(alpha_BTK, z_BTK, dms.mode != "train"), dms.window)
    return grouped_attention(q_BTHD, k_BTKD, v_BTKD, mask_B1TS, bias_BKTS)


@dataclasses.dataclass(frozen=True)
class DMSAttention:
    """llama.forward_aux(..., attention=DMSAttention(dms), rng=...); aux per layer: alpha_st_BTK (straight-through
    0/1 decisions for the compression loss), alpha_BTK (what the mask used) and a_BTK (the decision logits:
    dms/calibrate.py chooses a serving threshold from them). adapter_BTK: the layer's adapter
    logits (dms.decision='adapter'; llama.py passes them since reads_adapter is set)."""

    dms: DMSConfig
    reads_adapter = True

    def __call__(self, layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, rng: Optional[jax.Array],
                 adapter_BTK: Optional[jax.Array] = None):
        B, T = q_BTHD.shape[:2]
        a_BTK, q_BTHD = read_decision(q_BTHD, k_BTKD.shape[2], self.dms, adapter_BTK)
        alpha_BTK, alpha_st_BTK, z_BTK = decisions(a_BTK, sequence_starts(B, T, segment_ids_BT), self.dms, rng)
        out_BTHD = dms_core(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, z_BTK, positions_BT, segment_ids_BT, rope, self.dms)
        return out_BTHD, {"alpha_st_BTK": alpha_st_BTK, "alpha_BTK": alpha_BTK, "a_BTK": a_BTK}
