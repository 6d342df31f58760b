"""The plain dense KV cache: every token's post-RoPE key and value in a [L, B, K, S, Dh] buffer.

Shape letters: L layers, B batch, K KV heads, S slots (capacity), T prompt time, H query heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dmc_jax.cache.protocol import RopeFn, state_bytes
from dmc_jax.model.attention import causal_mask, decode_attention, grouped_attention
from dmc_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DenseCache:
    """Keeps everything: CR 1, the baseline every compression method is measured against."""

    name: str = "dense"

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_tokens, cfg.head_dim)
        return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        B, T = q_BTHD.shape[:2]
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q_BTHD, k_BTKD = rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT)
        # Right padding: causality alone keeps real queries off the padding keys.
        out_BTHD = grouped_attention(q_BTHD, k_BTKD, v_BTKD, causal_mask(positions_BT, positions_BT))
        new = {}
        for name, x_BTKD in (("k", k_BTKD), ("v", v_BTKD)):
            x_1BKTD = jnp.swapaxes(x_BTKD, 1, 2)[None].astype(state[name].dtype)
            new[name] = jax.lax.dynamic_update_slice(state[name], x_1BKTD, (layer, 0, 0, 0, 0))
        return out_BTHD, new

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        B = q_BHD.shape[0]
        q_BHD = rope(q_BHD[:, None], positions_B[:, None])[:, 0]
        k_BKD = rope(k_BKD[:, None], positions_B[:, None])[:, 0]
        batch = jnp.arange(B)
        new = {name: state[name].at[layer, batch, :, positions_B].set(x_BKD.astype(state[name].dtype))
               for name, x_BKD in (("k", k_BKD), ("v", v_BKD))}
        S = state["k"].shape[3]
        valid_BKS = jnp.broadcast_to((jnp.arange(S)[None, :] <= positions_B[:, None])[:, None], (B, 1, S))
        out_BHD = decode_attention(q_BHD, new["k"][layer], new["v"][layer], valid_BKS)
        return out_BHD, new

    def stats(self, state, tokens_B):
        L, B, K, S, Dh = state["k"].shape
        per_token = 2 * L * K * Dh * state["k"].dtype.itemsize
        kept_LBK = jnp.broadcast_to(tokens_B[None, :, None], (L, B, K)).astype(jnp.float32)
        return {
            "tokens_B": tokens_B,
            "kept_LBK": kept_LBK,
            "bytes_allocated": state_bytes(state),
            "bytes_in_use": jnp.sum(tokens_B) * per_token,
        }
