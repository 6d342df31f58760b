"""Per-layer attention inputs of real text and the calibration statistics of grouped keys and values.

A group merges t = num_kv_heads / new_kv_heads adjacent KV heads. Its calibration cache K_G (n x t*Dh) holds the
group's keys side by side; its top right singular vectors are the top eigenvectors of the Gram matrix
K_G^T K_G, which is accumulated batch by batch (float64 on the host), so n can be large.

Shape letters: L layers, B batch, T time, H query heads, K KV heads, J new KV heads (groups), A = t * Dh,
Dh head dim.
"""

from __future__ import annotations

import functools
from typing import Dict, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.model import llama
from dmc_jax.model.attention import causal_mask, grouped_attention
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import Params


def _qkv_attention(layer, q_BTHD, k_BTKD, v_BTKD, positions_BT, segment_ids_BT, rope, rng):
    """Vanilla causal attention that also returns its pre-RoPE q, k, v as aux."""
    B, T = q_BTHD.shape[:2]
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = causal_mask(index_BT, index_BT)
    out = grouped_attention(rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT), v_BTKD, mask)
    return out, {"q": q_BTHD, "k": k_BTKD, "v": v_BTKD}


@functools.partial(jax.jit, static_argnames=("cfg",))
def layer_qkv(params: Params, tokens_BT: jax.Array, cfg: ModelConfig) -> Dict[str, jax.Array]:
    """Pre-RoPE q [L, B, T, H, Dh], k and v [L, B, T, K, Dh] of every layer of a causal pass (fp32)."""
    return llama.forward_aux(params, tokens_BT, cfg, attention=_qkv_attention)[1]


def group_keys(x_LBTKD: jax.Array, new_kv_heads: int) -> jax.Array:
    """[L, B, T, K, Dh] -> [L, B*T, J, A]: each group's t heads side by side."""
    L, B, T, K, Dh = x_LBTKD.shape
    return x_LBTKD.reshape(L, B * T, new_kv_heads, (K // new_kv_heads) * Dh)


@functools.partial(jax.jit, static_argnames=("cfg", "new_kv_heads"))
def _batch_grams(params, tokens_BT, cfg: ModelConfig, new_kv_heads: int):
    acts = layer_qkv(params, tokens_BT, cfg)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    rope = Rope(cfg)
    k_rot_LBTKD = jax.vmap(lambda k: rope(k, positions_BT))(acts["k"])
    out = {}
    for name, x in (("k", acts["k"]), ("k_rot", k_rot_LBTKD), ("v", acts["v"])):
        x_LNJA = group_keys(x.astype(jnp.float32), new_kv_heads)
        out[name] = jnp.einsum("lnja,lnjb->ljab", x_LNJA, x_LNJA, precision=jax.lax.Precision.HIGHEST)
    return out


def calibration_grams(params: Params, cfg: ModelConfig, batches: Iterable[np.ndarray],
                      new_kv_heads: int) -> Dict[str, np.ndarray]:
    """Gram matrices [L, J, A, A] (float64) of the grouped pre-RoPE keys 'k', rotated keys 'k_rot' and values
    'v', summed over every token of `batches` (token arrays [B, T])."""
    total = None
    for tokens_BT in batches:
        grams = jax.tree.map(lambda x: np.asarray(x, np.float64),
                             _batch_grams(params, jnp.asarray(tokens_BT), cfg, new_kv_heads))
        total = grams if total is None else jax.tree.map(np.add, total, grams)
    if total is None:
        raise ValueError("no calibration batches")
    return total
