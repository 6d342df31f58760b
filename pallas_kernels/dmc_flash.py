"""Pallas (Triton lowering) flash attention with DMC's merge penalty: forward and backward (jax.custom_vjp).

Computes dmc_flash_ref without a T x T array: logits q_t . k_j * sm_scale + pen[k, j] * [j < t] under the causal
(and optional segment) mask, GQA. Gradients flow to q, k, v and the penalty vector (so to DMC's decision logits).

Shape letters: B batch, T time (Tp padded to the blocks), H query heads, K KV heads, G = H / K, Dh head dim,
Q / C query / key block rows.

Kernels (one program each):
    forward   (b, h, query block)   online softmax over key blocks up to the diagonal; writes out and the
                                    log-sum-exp per row (the residual of the backward)
    dk/dv/dpen (b, k, key block)    loops over the G query heads of the group and the query blocks at or below
                                    the diagonal: GQA sums stay in registers, no atomics; the penalty gradient
                                    is the column sum of dS strictly below the diagonal
    dq        (b, h, query block)   loops over key blocks up to the diagonal
With segment ids, loops skip whole blocks that share no segment (bounds from segment_block_bounds: packed short
documents cost what their own causal squares cost). Masking uses -inf with a guarded running max, so rows fully
masked in a block (segments) never produce NaN.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

_HIGHEST = jax.lax.Precision.HIGHEST  # fp32 inputs: IEEE dots (the Triton default would be tf32)


def _dot(a, b, contract=(1, 0)):
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), precision=_HIGHEST,
                               preferred_element_type=jnp.float32)


def _scores(q_QD, k_CD, pen_C, rows_Q, cols_C, sm_scale, seg_q_Q, seg_k_C):
    """Masked logits [Q, C] (fp32, -inf where not allowed) for one (query block, key block) pair."""
    s_QC = _dot(q_QD, k_CD, (1, 1)) * sm_scale
    below_QC = cols_C[None, :] < rows_Q[:, None]
    s_QC = s_QC + jnp.where(below_QC, pen_C[None, :], 0.0)
    allowed_QC = cols_C[None, :] <= rows_Q[:, None]
    if seg_q_Q is not None:
        allowed_QC = allowed_QC & (seg_q_Q[:, None] == seg_k_C[None, :])
    return jnp.where(allowed_QC, s_QC, -jnp.inf), below_QC


def _fwd_kernel(q_ref, k_ref, v_ref, pen_ref, *rest, sm_scale, block_k, has_seg):
    seg_ref, lo_ref, (o_ref, lse_ref) = (rest[0], rest[1], rest[2:]) if has_seg else (None, None, rest)
    Q, Dh = q_ref.shape
    i = pl.program_id(2)
    rows_Q = i * Q + jnp.arange(Q)
    q_QD = q_ref[...]
    seg_q_Q = seg_ref[pl.ds(i * Q, Q)] if has_seg else None

    def body(j, carry):
        o_QD, m_Q, l_Q = carry
        cols_C = j * block_k + jnp.arange(block_k)
        k_CD = k_ref[pl.ds(j * block_k, block_k), :]
        v_CD = v_ref[pl.ds(j * block_k, block_k), :]
        seg_k_C = seg_ref[pl.ds(j * block_k, block_k)] if has_seg else None
        s_QC, _ = _scores(q_QD, k_CD, pen_ref[pl.ds(j * block_k, block_k)], rows_Q, cols_C, sm_scale, seg_q_Q,
                          seg_k_C)
        m_new = jnp.maximum(m_Q, jnp.max(s_QC, axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        corr_Q = jnp.exp(m_Q - m_safe)
        p_QC = jnp.exp(s_QC - m_safe[:, None])
        o_QD = o_QD * corr_Q[:, None] + _dot(p_QC.astype(v_CD.dtype), v_CD)
        return o_QD, m_new, l_Q * corr_Q + jnp.sum(p_QC, axis=1)

    init = (jnp.zeros((Q, Dh), jnp.float32), jnp.full((Q,), -jnp.inf, jnp.float32), jnp.zeros((Q,), jnp.float32))
    lo = lo_ref[0] if has_seg else 0  # key blocks before the block's earliest segment start hold no allowed key
    o_QD, m_Q, l_Q = jax.lax.fori_loop(lo, pl.cdiv((i + 1) * Q, block_k), body, init)
    o_ref[...] = (o_QD / l_Q[:, None]).astype(o_ref.dtype)  # l > 0: the diagonal is always allowed
    lse_ref[...] = m_Q + jnp.log(l_Q)


def _dkv_kernel(q_ref, k_ref, v_ref, pen_ref, do_ref, lse_ref, delta_ref, *rest, sm_scale, block_q, has_seg):
    seg_ref, hi_ref, (dk_ref, dv_ref, dpen_ref) = (rest[0], rest[1], rest[2:]) if has_seg else (None, None, rest)
    C, Dh = k_ref.shape
    Tp, G = q_ref.shape[0], q_ref.shape[1]
    j = pl.program_id(2)
    cols_C = j * C + jnp.arange(C)
    k_CD, v_CD, pen_C = k_ref[...], v_ref[...], pen_ref[...]
    seg_k_C = seg_ref[pl.ds(j * C, C)] if has_seg else None
    first = (j * C) // block_q
    # query blocks after the block's latest segment end see none of its keys
    end = jnp.minimum(hi_ref[0], Tp // block_q) if has_seg else Tp // block_q
    n_q = jnp.maximum(end - first, 0)

    def body(idx, carry):
        dk_CD, dv_CD, dpen_C = carry
        g, i = idx // n_q, first + idx % n_q
        rows_Q = i * block_q + jnp.arange(block_q)
        q_QD = q_ref[pl.ds(i * block_q, block_q), g, :]
        do_QD = do_ref[pl.ds(i * block_q, block_q), g, :]
        lse_Q = lse_ref[g, pl.ds(i * block_q, block_q)]
        delta_Q = delta_ref[g, pl.ds(i * block_q, block_q)]
        seg_q_Q = seg_ref[pl.ds(i * block_q, block_q)] if has_seg else None
        s_QC, below_QC = _scores(q_QD, k_CD, pen_C, rows_Q, cols_C, sm_scale, seg_q_Q, seg_k_C)
        p_QC = jnp.exp(s_QC - lse_Q[:, None])
        dv_CD = dv_CD + _dot(p_QC.astype(do_QD.dtype), do_QD, (0, 0))
        ds_QC = p_QC * (_dot(do_QD, v_CD, (1, 1)) - delta_Q[:, None])
        dk_CD = dk_CD + _dot(ds_QC.astype(q_QD.dtype), q_QD, (0, 0))
        dpen_C = dpen_C + jnp.sum(jnp.where(below_QC, ds_QC, 0.0), axis=0)
        return dk_CD, dv_CD, dpen_C

    init = (jnp.zeros((C, Dh), jnp.float32), jnp.zeros((C, Dh), jnp.float32), jnp.zeros((C,), jnp.float32))
    dk_CD, dv_CD, dpen_C = jax.lax.fori_loop(0, G * n_q, body, init)
    dk_ref[...] = (dk_CD * sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CD.astype(dv_ref.dtype)
    dpen_ref[...] = dpen_C


def _dq_kernel(q_ref, k_ref, v_ref, pen_ref, do_ref, lse_ref, delta_ref, *rest, sm_scale, block_k, has_seg):
    seg_ref, lo_ref, (dq_ref,) = (rest[0], rest[1], rest[2:]) if has_seg else (None, None, rest)
    Q, Dh = q_ref.shape
    i = pl.program_id(2)
    rows_Q = i * Q + jnp.arange(Q)
    q_QD, do_QD, lse_Q, delta_Q = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    seg_q_Q = seg_ref[pl.ds(i * Q, Q)] if has_seg else None

    def body(j, dq_QD):
        cols_C = j * block_k + jnp.arange(block_k)
        k_CD = k_ref[pl.ds(j * block_k, block_k), :]
        v_CD = v_ref[pl.ds(j * block_k, block_k), :]
        seg_k_C = seg_ref[pl.ds(j * block_k, block_k)] if has_seg else None
        s_QC, _ = _scores(q_QD, k_CD, pen_ref[pl.ds(j * block_k, block_k)], rows_Q, cols_C, sm_scale, seg_q_Q,
                          seg_k_C)
        p_QC = jnp.exp(s_QC - lse_Q[:, None])
        ds_QC = p_QC * (_dot(do_QD, v_CD, (1, 1)) - delta_Q[:, None])
        return dq_QD + _dot(ds_QC.astype(k_CD.dtype), k_CD)

    lo = lo_ref[0] if has_seg else 0
    dq_QD = jax.lax.fori_loop(lo, pl.cdiv((i + 1) * Q, block_k), body, jnp.zeros((Q, Dh), jnp.float32))
    dq_ref[...] = (dq_QD * sm_scale).astype(dq_ref.dtype)


def _params(cfg):
    return pltriton.CompilerParams(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _forward(cfg, q, k, v, pen, seg):
    B, Tp, H, Dh = q.shape
    K = k.shape[2]
    G, Q, C = H // K, cfg["block_q"], cfg["block_k"]
    has_seg = seg is not None
    kv_spec = pl.BlockSpec((None, Tp, None, Dh), lambda b, h, i: (b, 0, h // G, 0))
    in_specs = [pl.BlockSpec((None, Q, None, Dh), lambda b, h, i: (b, i, h, 0)), kv_spec, kv_spec,
                pl.BlockSpec((None, None, Tp), lambda b, h, i: (b, h // G, 0))]
    args = [q, k, v, pen]
    if has_seg:
        in_specs += [pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0)),
                     pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i, 0))]
        args += [seg[0], seg[1]]
    kernel = functools.partial(_fwd_kernel, sm_scale=cfg["sm_scale"], block_k=C, has_seg=has_seg)
    return pl.pallas_call(
        kernel, grid=(B, H, Tp // Q), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, Q, None, Dh), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, Q), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=_params(cfg), interpret=cfg["interpret"], name="dmc_flash_fwd")(*args)


def _backward(cfg, q, k, v, pen, seg, out, lse, do):
    B, Tp, H, Dh = q.shape
    K = k.shape[2]
    G, Q, C = H // K, cfg["block_q"], cfg["block_k"]
    has_seg = seg is not None
    delta = jnp.einsum("bthd,bthd->bht", out.astype(jnp.float32), do.astype(jnp.float32))

    # dk, dv, dpen: one program per key block of a KV head, all G query heads of its group.
    group_spec = pl.BlockSpec((None, Tp, G, Dh), lambda b, kh, j: (b, 0, kh, 0))
    stat_spec = pl.BlockSpec((None, G, Tp), lambda b, kh, j: (b, kh, 0))
    key_spec = pl.BlockSpec((None, C, None, Dh), lambda b, kh, j: (b, j, kh, 0))
    pen_spec = pl.BlockSpec((None, None, C), lambda b, kh, j: (b, kh, j))
    dk, dv, dpen = pl.pallas_call(
        functools.partial(_dkv_kernel, sm_scale=cfg["sm_scale"], block_q=Q, has_seg=has_seg),
        grid=(B, K, Tp // C),
        in_specs=[group_spec, key_spec, key_spec, pen_spec, group_spec, stat_spec, stat_spec]
        + [pl.BlockSpec((None, Tp), lambda b, kh, j: (b, 0)),
           pl.BlockSpec((None, None, 1), lambda b, kh, j: (b, j, 0))] * has_seg,
        out_specs=[key_spec, key_spec, pen_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   jax.ShapeDtypeStruct(pen.shape, jnp.float32)],
        compiler_params=_params(cfg), interpret=cfg["interpret"], name="dmc_flash_dkv",
    )(q, k, v, pen, do, lse, delta, *([seg[0], seg[2]] if has_seg else []))

    # dq: one program per query block of a query head.
    row_spec = pl.BlockSpec((None, Q, None, Dh), lambda b, h, i: (b, i, h, 0))
    kv_spec = pl.BlockSpec((None, Tp, None, Dh), lambda b, h, i: (b, 0, h // G, 0))
    rstat_spec = pl.BlockSpec((None, None, Q), lambda b, h, i: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, sm_scale=cfg["sm_scale"], block_k=C, has_seg=has_seg),
        grid=(B, H, Tp // Q),
        in_specs=[row_spec, kv_spec, kv_spec, pl.BlockSpec((None, None, Tp), lambda b, h, i: (b, h // G, 0)),
                  row_spec, rstat_spec, rstat_spec]
        + [pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0)),
           pl.BlockSpec((None, None, 1), lambda b, h, i: (b, i, 0))] * has_seg,
        out_specs=row_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(cfg), interpret=cfg["interpret"], name="dmc_flash_dq",
    )(q, k, v, pen, do, lse, delta, *([seg[0], seg[1]] if has_seg else []))
    return dq, dk, dv, dpen.astype(pen.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg, q, k, v, pen, seg):
    return _forward(cfg, q, k, v, pen, seg)[0]


def _flash_fwd(cfg, q, k, v, pen, seg):
    out, lse = _forward(cfg, q, k, v, pen, seg)
    return out, (q, k, v, pen, seg, out, lse)


def _flash_bwd(cfg, res, do):
    q, k, v, pen, seg, out, lse = res
    dq, dk, dv, dpen = _backward(cfg, q, k, v, pen, seg, out, lse, do)
    return dq, dk, dv, dpen, None


_flash.defvjp(_flash_fwd, _flash_bwd)


class _Cfg(dict):
    """Static kernel settings (hashable, so it can be a nondiff argument)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


@functools.partial(jax.jit, static_argnames=("sm_scale", "block_q", "block_k", "num_warps", "num_stages",
                                             "interpret"))
def dmc_flash_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, pen_BKT: jax.Array,
                        segment_ids_BT: jax.Array | None = None, *, sm_scale: float | None = None,
                        block_q: int = 64, block_k: int = 64, num_warps: int = 4, num_stages: int = 2,
                        interpret: bool = False) -> jax.Array:
    """DMC training attention [B, T, H, Dh] (see dmc_flash_ref), differentiable in q, k, v and pen.

    T is padded to a multiple of the blocks and Dh to a power of two (zeros change no dot product); padded keys
    sit after every real query, so causality alone keeps them out. block_q, block_k: powers of two >= 16.
    """
    B, T, H, Dh = q_BTHD.shape
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16; got {blk}")
    cfg = _Cfg(sm_scale=float(Dh ** -0.5 if sm_scale is None else sm_scale), block_q=block_q, block_k=block_k,
               num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    Tp = pl.cdiv(T, max(block_q, block_k)) * max(block_q, block_k)
    Dp = max(16, 1 << (Dh - 1).bit_length())
    pad = lambda x: jnp.pad(x, ((0, 0), (0, Tp - T), (0, 0), (0, Dp - Dh)))
    pen = jnp.pad(pen_BKT, ((0, 0), (0, 0), (0, Tp - T)))
    seg = None
    if segment_ids_BT is not None:
        seg_BT = jnp.pad(segment_ids_BT.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)
        seg = (seg_BT, *segment_block_bounds(seg_BT, block_q, block_k))
    out = _flash(cfg, pad(q_BTHD), pad(k_BTKD), pad(v_BTKD), pen, seg)
    return out[:, :T, :, :Dh]


def segment_block_bounds(seg_BT: jax.Array, block_q: int, block_k: int):
    """Per query block the first key block that can share a segment with it, per key block the query-block end.

    Any segment ids (not only contiguous runs): a token's segment spans from the first to the last occurrence of
    its id, found with a stable sort. Returns kv_lo [B, T / block_q, 1] and q_hi [B, T / block_k, 1] (int32).
    """
    B, Tp = seg_BT.shape
    order_BT = jnp.argsort(seg_BT, axis=1, stable=True)
    sorted_BT = jnp.take_along_axis(seg_BT, order_BT, axis=1)
    idx_T = jnp.arange(Tp, dtype=jnp.int32)
    change_BT = sorted_BT[:, 1:] != sorted_BT[:, :-1]
    start_BT = jax.lax.cummax(jnp.where(jnp.pad(change_BT, ((0, 0), (1, 0)), constant_values=True), idx_T, 0), axis=1)
    end_BT = jax.lax.cummin(jnp.where(jnp.pad(change_BT, ((0, 0), (0, 1)), constant_values=True), idx_T, Tp - 1),
                            axis=1, reverse=True)
    inverse_BT = jnp.argsort(order_BT, axis=1)
    first_BT = jnp.take_along_axis(jnp.take_along_axis(order_BT, start_BT, axis=1), inverse_BT, axis=1)
    last_BT = jnp.take_along_axis(jnp.take_along_axis(order_BT, end_BT, axis=1), inverse_BT, axis=1)
    kv_lo = first_BT.reshape(B, Tp // block_q, block_q).min(-1) // block_k
    q_hi = last_BT.reshape(B, Tp // block_k, block_k).max(-1) // block_q + 1
    return kv_lo.astype(jnp.int32)[..., None], q_hi.astype(jnp.int32)[..., None]


def dmc_flash_flops(B: int, T: int, H: int, Dh: int, backward: bool = False) -> float:
    """Matmul FLOPs of the causal pass (half the T x T square): 2 products forward, 5 in the backward."""
    per_product = 2.0 * B * H * Dh * T * (T + 1) / 2
    return per_product * (5 if backward else 2)
