"""Pallas (Triton lowering) decode attention over a paged, ragged DMC cache, flash-decoding style.

Shape letters: B batch, H query heads, K KV heads, G = H / K query heads per KV head (Gp: padded to a power of
two >= 16, the smallest tensor-core tile), Dh head dim, P pool pages, N tokens per page, M max pages per head,
S context splits, R pages per split.

One program per (batch, KV head, split): it keeps the G query heads of the group in one [Gp, Dh] tile, walks the
split's pages `pages_per_block` at a time (page ids read from the block table inside the kernel, so the gather
never reaches device memory), and stops at the head's own slot count: a head at CR 8 reads an eighth of the
pages of an uncompressed one. Each split writes its partial output, running max and sum of exponentials; a small
jnp combine merges the splits (the split axis matters when B x K alone cannot fill the GPU).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 inputs: IEEE dots (the Triton default would be tf32)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _kernel(q_ref, pool_k_ref, pool_v_ref, table_ref, count_ref, o_ref, m_ref, l_ref, *, sm_scale: float,
            pages_per_block: int, num_pages: int):
    Gp, Dh = q_ref.shape
    N = pool_k_ref.shape[1]
    R = table_ref.shape[0]
    block_tokens = pages_per_block * N
    split = pl.program_id(2)
    count = count_ref[0]
    start = split * R * N
    todo = jnp.clip(count - start, 0, R * N)  # this split's slots in use
    q_GD = q_ref[...]

    def body(i, carry):
        o_GD, m_G, l_G = carry
        ids = jnp.clip(table_ref[pl.ds(i * pages_per_block, pages_per_block)], 0, num_pages - 1)
        k_TD = pool_k_ref[ids].reshape(block_tokens, Dh)
        v_TD = pool_v_ref[ids].reshape(block_tokens, Dh)
        s_GT = jax.lax.dot_general(q_GD, k_TD, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                                   preferred_element_type=jnp.float32) * sm_scale
        valid_T = i * block_tokens + jnp.arange(block_tokens) < todo
        s_GT = jnp.where(valid_T[None, :], s_GT, -jnp.inf)
        m_new = jnp.maximum(m_G, jnp.max(s_GT, axis=1))  # finite: every block holds >= 1 slot in use
        corr_G = jnp.exp(m_G - m_new)
        p_GT = jnp.exp(s_GT - m_new[:, None])
        # Slots past the count may hold stale or uninitialised data: keep them out of the product (0 * inf).
        v_TD = jnp.where(valid_T[:, None], v_TD, jnp.zeros_like(v_TD))
        pv_GD = jax.lax.dot_general(p_GT.astype(v_TD.dtype), v_TD, (((1,), (0,)), ((), ())), precision=_HIGHEST,
                                    preferred_element_type=jnp.float32)
        return o_GD * corr_G[:, None] + pv_GD, m_new, l_G * corr_G + jnp.sum(p_GT, axis=1)

    init = (jnp.zeros((Gp, Dh), jnp.float32), jnp.full((Gp,), -jnp.inf, jnp.float32), jnp.zeros((Gp,), jnp.float32))
    o_GD, m_G, l_G = jax.lax.fori_loop(0, pl.cdiv(todo, block_tokens), body, init)
    o_ref[...] = o_GD
    m_ref[...] = m_G
    l_ref[...] = l_G


def supported(page_size: int, head_dim: int) -> bool:
    """Whether paged_decode takes this page size and head dim (otherwise use the reference)."""
    return _pow2(page_size) and _pow2(head_dim) and head_dim >= 16


def default_pages_per_split(batch_heads: int, max_pages: int, pages_per_block: int, programs: int = 264) -> int:
    """Pages per split: enough splits that B x K x S reaches `programs` (2 per SM on an H100), whole blocks."""
    blocks = pl.cdiv(max_pages, pages_per_block)
    splits = max(1, min(blocks, pl.cdiv(programs, batch_heads)))
    return pl.cdiv(blocks, splits) * pages_per_block


@functools.partial(jax.jit, static_argnames=("sm_scale", "pages_per_block", "pages_per_split", "num_warps",
                                             "num_stages", "interpret"))
def paged_decode(q_BHD: jax.Array, pool_k_PND: jax.Array, pool_v_PND: jax.Array, block_table_BKM: jax.Array,
                 count_BK: jax.Array, *, sm_scale: float | None = None, pages_per_block: int | None = None,
                 pages_per_split: int | None = None, num_warps: int = 4, num_stages: int = 2,
                 interpret: bool = False) -> jax.Array:
    """Decode attention [B, H, Dh] over the first count[b, k] slots of each head's pages (see paged_decode_ref).

    Needs N and Dh powers of two, Dh >= 16 (Triton tiles; see supported()). pages_per_block: pages per inner step (default 64 tokens' worth);
    pages_per_split: pages per program along the context (default: fill the GPU, see default_pages_per_split).
    """
    B, H, Dh = q_BHD.shape
    P, N, _ = pool_k_PND.shape
    _, K, M = block_table_BKM.shape
    G = H // K
    if not (_pow2(N) and _pow2(Dh) and Dh >= 16):
        raise ValueError(f"paged_decode needs a power-of-two page size and head dim >= 16; got page {N}, "
                         f"head dim {Dh}")
    scale = Dh ** -0.5 if sm_scale is None else sm_scale
    ppb = pages_per_block or max(1, 64 // N)
    if not _pow2(ppb) or ppb * N < 16:
        raise ValueError(f"pages_per_block must be a power of two with pages_per_block x page >= 16 (the "
                         f"smallest tensor-core tile); got {ppb} x {N}")
    R = pages_per_split or default_pages_per_split(B * K, M, ppb)
    R = pl.cdiv(R, ppb) * ppb
    S = pl.cdiv(M, R)
    Gp = max(16, 1 << (G - 1).bit_length())
    q_BKGD = jnp.pad(q_BHD.reshape(B, K, G, Dh), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
    table_BKSR = jnp.pad(block_table_BKM.astype(jnp.int32), ((0, 0), (0, 0), (0, S * R - M))).reshape(B, K, S, R)
    count_BK1 = count_BK.astype(jnp.int32)[..., None]
    kernel = functools.partial(_kernel, sm_scale=scale, pages_per_block=ppb, num_pages=P)
    o_BKSGD, m_BKSG, l_BKSG = pl.pallas_call(
        kernel,
        grid=(B, K, S),
        in_specs=[
            pl.BlockSpec((None, None, Gp, Dh), lambda b, k, s: (b, k, 0, 0)),
            pl.BlockSpec((P, N, Dh), lambda b, k, s: (0, 0, 0)),
            pl.BlockSpec((P, N, Dh), lambda b, k, s: (0, 0, 0)),
            pl.BlockSpec((None, None, None, R), lambda b, k, s: (b, k, s, 0)),
            pl.BlockSpec((None, None, 1), lambda b, k, s: (b, k, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, Gp, Dh), lambda b, k, s: (b, k, s, 0, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, k, s: (b, k, s, 0)),
            pl.BlockSpec((None, None, None, Gp), lambda b, k, s: (b, k, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((B, K, S, Gp, Dh), jnp.float32),
            jax.ShapeDtypeStruct((B, K, S, Gp), jnp.float32),
            jax.ShapeDtypeStruct((B, K, S, Gp), jnp.float32),
        ],
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="dmc_paged_decode",
    )(q_BKGD, pool_k_PND, pool_v_PND, table_BKSR, count_BK1)
    out_BKGD = combine_splits(o_BKSGD, m_BKSG, l_BKSG)[:, :, :G]
    return out_BKGD.reshape(B, H, Dh).astype(q_BHD.dtype)


def combine_splits(o_BKSGD: jax.Array, m_BKSG: jax.Array, l_BKSG: jax.Array) -> jax.Array:
    """Merges per-split (unnormalised output, max, sum of exponentials) into the softmax output [B, K, G, Dh].

    Empty splits carry m = -inf, l = 0; a head with no slot at all gives zeros.
    """
    m_BKG = jnp.max(m_BKSG, axis=2)
    w_BKSG = jnp.where(m_BKSG == -jnp.inf, 0.0, jnp.exp(m_BKSG - jnp.where(m_BKG == -jnp.inf, 0.0, m_BKG)[:, :, None]))
    l_BKG = jnp.sum(w_BKSG * l_BKSG, axis=2)
    o_BKGD = jnp.sum(w_BKSG[..., None] * o_BKSGD, axis=2)
    return jnp.where(l_BKG[..., None] > 0, o_BKGD / jnp.where(l_BKG > 0, l_BKG, 1.0)[..., None], 0.0)


def paged_decode_bytes(B: int, H: int, Dh: int, count_BK, page_size: int, itemsize: int) -> int:
    """Fewest bytes the kernel must move: q and out once, and each head's pages in use (K and V) once."""
    pages = sum(math.ceil(int(c) / page_size) for c in jnp.ravel(jnp.asarray(count_BK)).tolist())
    return 2 * B * H * Dh * itemsize + 2 * pages * page_size * Dh * itemsize
