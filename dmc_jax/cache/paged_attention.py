"""Decode attention over a paged KV layout (XLA): each (sequence, KV head) owns pages of a shared pool.

    paged_decode_attention           the reference: gather every page the block table names, mask by count
    paged_decode_attention_bucketed  the same function over the narrowest of a few static table prefixes (widths
                                     M, M/g, M/g^2, ...) that holds the longest head, picked with lax.switch: the
                                     gather and the attention follow the slots in use (to within g), not the
                                     table width, which is what makes the paged cache fast without a kernel
The Pallas kernel (pallas_kernels/paged_decode.py, dispatched by dmc_jax.kernels) computes the same function on GPU.
Slot s of head (b, k) lives at pool[block_table[b, k, s // N], s % N]; slots s < count[b, k] are in use, table
entries past them may be -1 (unallocated).

Shape letters: B batch, H query heads, K KV heads, Dh head dim, P pool pages, N page size (slots per page),
M block-table width (pages per head), S = M * N slots per head, X = N * Dh values per page.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dmc_jax.model.attention import decode_attention


def gather_pages(pool_PND: jax.Array, block_table_BKM: jax.Array) -> jax.Array:
    """[B, K, M * N, Dh]: each head's pages laid end to end (unallocated entries read page 0: mask them)."""
    B, K, M = block_table_BKM.shape
    P, N, Dh = pool_PND.shape
    # Whole pages as rows of [P, N * Dh]: XLA:CPU gathers long contiguous rows much faster than [N, Dh] blocks.
    rows_BKMX = pool_PND.reshape(P, N * Dh).at[jnp.clip(block_table_BKM, 0, P - 1)].get(mode="promise_in_bounds")
    return rows_BKMX.reshape(B, K, M * N, Dh)


def paged_decode_attention(q_BHD: jax.Array, pool_k_PND: jax.Array, pool_v_PND: jax.Array,
                           block_table_BKM: jax.Array, count_BK: jax.Array) -> jax.Array:
    """One query per sequence against the first count_BK slots of each head's pages; returns [B, H, Dh]."""
    k_BKSD = gather_pages(pool_k_PND, block_table_BKM)
    v_BKSD = gather_pages(pool_v_PND, block_table_BKM)
    valid_BKS = jnp.arange(k_BKSD.shape[2])[None, None] < count_BK[..., None]
    return decode_attention(q_BHD, k_BKSD, v_BKSD, valid_BKS)


def bucket_widths(M: int, N: int, growth: float, min_slots: int = 64) -> tuple:
    """Table widths (pages) M, M / growth, M / growth^2, ... (rounded up), down to about min_slots slots."""
    widths = [M]
    while growth > 1 and widths[-1] * N > min_slots:
        w = max(1, math.ceil(widths[-1] / growth))
        if w == widths[-1]:
            break
        widths.append(w)
    return tuple(widths)


def paged_decode_attention_bucketed(q_BHD: jax.Array, pool_k_PND: jax.Array, pool_v_PND: jax.Array,
                                    block_table_BKM: jax.Array, count_BK: jax.Array, growth: float) -> jax.Array:
    """paged_decode_attention over the narrowest table prefix (of bucket_widths) that holds the longest head.

    Static shapes: one branch of a lax.switch per width; the work follows the slots in use to within `growth`.
    """
    M = block_table_BKM.shape[2]
    N = pool_k_PND.shape[1]
    widths = bucket_widths(M, N, growth)
    pages = (jnp.max(count_BK) + N - 1) // N
    # widths decrease: the branch is the last one still wide enough
    branch = jnp.sum(jnp.asarray(widths[1:], jnp.int32) >= pages)
    branches = [lambda q, k, v, t, c, w=w: paged_decode_attention(q, k, v, t[:, :, :w], c) for w in widths]
    return jax.lax.switch(branch, branches, q_BHD, pool_k_PND, pool_v_PND, block_table_BKM, count_BK)
