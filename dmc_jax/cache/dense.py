"""The plain dense KV cache: every token's post-RoPE key and value in a [L, B, K, S, Dh] buffer.

Shape letters: L layers, B batch, K KV heads, S slots (capacity), T prompt time, H query heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dmc_jax.cache import registry
from dmc_jax.cache.protocol import RopeFn, RowOps, state_bytes
from dmc_jax.model.attention import causal_mask, decode_attention, grouped_attention
from dmc_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DenseCache(RowOps):
    """Keeps everything: CR 1, the baseline every compression method is measured against."""

    name: str = "dense"
    supports_prefill_start = True  # prefill can continue rows already in the cache (chunked prefill, multi-turn)

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_tokens, cfg.head_dim)
        return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn, starts_B=None):
        if starts_B is not None:
            return self._continue(state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope, starts_B)
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

    def _continue(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn, starts_B):
        """Prefill of chunks that continue rows already holding starts_B tokens: the chunk's token t sits at
        position starts_B + t; it attends to the row's cached tokens and the chunk's earlier ones."""
        B, T = q_BTHD.shape[:2]
        positions_BT = starts_B[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        q_BTHD, k_BTKD = rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT)
        S = state["k"].shape[3]
        real_BT = jnp.arange(T)[None] < lengths_B[:, None]
        slot_BT = jnp.where(real_BT, positions_BT, S)  # padding is written nowhere (out of range: dropped)
        batch_BT = jnp.broadcast_to(jnp.arange(B)[:, None], (B, T))
        new = {name: state[name].at[layer, batch_BT, :, slot_BT].set(x_BTKD.astype(state[name].dtype), mode="drop")
               for name, x_BTKD in (("k", k_BTKD), ("v", v_BTKD))}
        keys_BSKD = jnp.swapaxes(new["k"][layer], 1, 2)
        values_BSKD = jnp.swapaxes(new["v"][layer], 1, 2)
        key_pos_BS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
        out_BTHD = grouped_attention(q_BTHD, keys_BSKD.astype(q_BTHD.dtype), values_BSKD.astype(q_BTHD.dtype),
                                     causal_mask(positions_BT, key_pos_BS))
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


registry.register(registry.MethodSpec(
    name="dense", build=lambda section, hparams: DenseCache(),
    summary="every token's key and value (CR 1): the baseline"))
