"""Grouped-query softmax attention (the XLA reference every cache method and kernel is compared with).

Shape letters: B batch, T query positions, S key slots, H query heads, K KV heads, G = H / K query heads per KV
head, Dh head dim. Masks are boolean (True = may attend) and broadcast over K (pass K = 1 for a shared mask).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmc_jax.model import attention_vjp
from dmc_jax.model.linear import use_canonical

NEG_INF = -1e30


def grouped_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BKTS: jax.Array,
                      bias_BKTS: jax.Array | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(Dh) + bias, masked) v per KV group, fp32 softmax; returns [B, T, H, Dh].

    On CPU the same computation runs with a custom VJP (model/attention_vjp.py: canonical matmuls, no T x S
    residual); this einsum form is the reference it is tested against.
    """
    if use_canonical():
        return attention_vjp.grouped_attention(q_BTHD, k_BSKD, v_BSKD, mask_BKTS, bias_BKTS)
    return reference_grouped_attention(q_BTHD, k_BSKD, v_BSKD, mask_BKTS, bias_BKTS)


def reference_grouped_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BKTS: jax.Array,
                                bias_BKTS: jax.Array | None = None) -> jax.Array:
    """grouped_attention as plain einsums (differentiated by autodiff)."""
    B, T, H, Dh = q_BTHD.shape
    K = k_BSKD.shape[2]
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, Dh)
    scores_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BSKD,
                              preferred_element_type=jnp.float32) * (Dh ** -0.5)
    if bias_BKTS is not None:
        scores_BKGTS = scores_BKGTS + bias_BKTS[:, :, None].astype(jnp.float32)
    scores_BKGTS = jnp.where(mask_BKTS[:, :, None], scores_BKGTS, NEG_INF)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1)
    # A row with nothing to attend to (padding) gets zeros rather than a uniform average of garbage.
    probs_BKGTS = jnp.where(jnp.any(mask_BKTS, axis=-1, keepdims=True)[:, :, None], probs_BKGTS, 0.0)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", probs_BKGTS.astype(v_BSKD.dtype), v_BSKD,
                           preferred_element_type=jnp.float32)
    return out_BTKGD.reshape(B, T, H, Dh).astype(q_BTHD.dtype)


def causal_mask(q_positions_BT: jax.Array, k_positions_BS: jax.Array,
                q_segments_BT: jax.Array | None = None, k_segments_BS: jax.Array | None = None) -> jax.Array:
    """[B, 1, T, S] mask: key position <= query position, and same segment when segment ids are given."""
    mask_BTS = k_positions_BS[:, None, :] <= q_positions_BT[:, :, None]
    if q_segments_BT is not None:
        mask_BTS &= q_segments_BT[:, :, None] == k_segments_BS[:, None, :]
    return mask_BTS[:, None]


def decode_attention(q_BHD: jax.Array, k_BKSD: jax.Array, v_BKSD: jax.Array, valid_BKS: jax.Array) -> jax.Array:
    """One query token per sequence against per-head key/value slots; valid_BKS marks the slots in use."""
    B, H, Dh = q_BHD.shape
    K = k_BKSD.shape[1]
    q_BKGD = q_BHD.reshape(B, K, H // K, Dh)
    scores_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKSD, preferred_element_type=jnp.float32) * (Dh ** -0.5)
    scores_BKGS = jnp.where(valid_BKS[:, :, None], scores_BKGS, NEG_INF)
    probs_BKGS = jax.nn.softmax(scores_BKGS, axis=-1)
    out_BKGD = jnp.einsum("bkgs,bksd->bkgd", probs_BKGS.astype(v_BKSD.dtype), v_BKSD,
                          preferred_element_type=jnp.float32)
    return out_BKGD.reshape(B, H, Dh).astype(q_BHD.dtype)
