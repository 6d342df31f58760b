"""Pure-jnp reference of decode attention over a paged, ragged (per KV head) cache: the function the kernel computes.

Shape letters: B batch, H query heads, K KV heads, G = H / K, Dh head dim, P pages in the pool, N tokens per page,
M max pages per (batch, KV head). Slot s of head (b, k) lives at pool[block_table[b, k, s // N], s % N]; slots
s < count[b, k] are in use. A head with count 0 gives zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def paged_decode_ref(q_BHD: jax.Array, pool_k_PND: jax.Array, pool_v_PND: jax.Array, block_table_BKM: jax.Array,
                     count_BK: jax.Array, sm_scale: float | None = None) -> jax.Array:
    """softmax(q k^T * sm_scale) v over each head's first count slots, fp32 softmax; returns [B, H, Dh]."""
    B, H, Dh = q_BHD.shape
    _, K, M = block_table_BKM.shape
    N = pool_k_PND.shape[1]
    scale = Dh ** -0.5 if sm_scale is None else sm_scale
    k_BKSD = pool_k_PND[block_table_BKM].reshape(B, K, M * N, Dh)
    v_BKSD = pool_v_PND[block_table_BKM].reshape(B, K, M * N, Dh)
    q_BKGD = q_BHD.reshape(B, K, H // K, Dh)
    scores_BKGS = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKSD, preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST) * scale
    valid_BK1S = (jnp.arange(M * N)[None, None] < count_BK[..., None])[:, :, None]
    scores_BKGS = jnp.where(valid_BK1S, scores_BKGS, -jnp.inf)
    m_BKG1 = jnp.max(scores_BKGS, axis=-1, keepdims=True)
    p_BKGS = jnp.where(valid_BK1S, jnp.exp(scores_BKGS - jnp.where(jnp.isfinite(m_BKG1), m_BKG1, 0.0)), 0.0)
    l_BKG1 = jnp.sum(p_BKGS, axis=-1, keepdims=True)
    out_BKGD = jnp.einsum("bkgs,bksd->bkgd", p_BKGS.astype(v_BKSD.dtype), v_BKSD,
                          preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
    out_BKGD = jnp.where(l_BKG1 > 0, out_BKGD / jnp.where(l_BKG1 > 0, l_BKG1, 1.0), 0.0)
    return out_BKGD.reshape(B, H, Dh).astype(q_BHD.dtype)
