"""grouped_attention's CPU form: a custom VJP whose matmuls are canonical and which keeps no T x S residual.

Shape letters: B batch, T query positions, S key slots, K KV heads, G query heads per KV head, R = G * T rows
(the G query heads of a KV head stacked over time), D head dim.

Autodiff of the reference (model/attention.py) saves the fp32 probabilities [B, K, G, T, S] of every layer for
the backward pass and differentiates its einsums into contractions that XLA:CPU upcasts to fp32 or runs outside
its fast matmul library (see model/linear.py). Here the forward saves q, k, v (compute dtype) and the log-sum-exp
per row; the backward recomputes the probabilities (one more q k^T, flash-attention style) and writes its four
products as batched canonical matmuls over (B, K): dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, with
dS = P (dP - rowsum(P dP)) in fp32 and cast to the compute dtype for the matmuls. The forward computes what the
reference computes, with the same softmax.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from dmc_jax.model.linear import materialized_transpose

NEG_INF = -1e30  # model/attention.py's (which imports this module)


def _heads_major(x_BSKD):
    """[B, S, K, D] -> [B, K, S, D], materialized (a plain transpose is a layout change XLA folds into the dots)."""
    B, S, K, D = x_BSKD.shape
    f = 2 if S % 2 == 0 else 1
    split = jnp.transpose(x_BSKD.reshape(B, f, S // f, K, D), (0, 3, 1, 2, 4))
    return split.reshape(B, K, S, D)


def _bmm(a, b):
    """[..., M, K] @ [..., K, N] batched over the leading dims, fp32 accumulation."""
    n = a.ndim - 2
    batch = tuple(range(n))
    return jax.lax.dot_general(a, b, (((n + 1,), (n,)), (batch, batch)), preferred_element_type=jnp.float32)


def _scores(q_BKRD, k_BKDS, mask_BKTS, bias_BKTS, G):
    """Masked fp32 scores [B, K, G, T, S] (scaled, biased) and the row validity [B, K, 1, T, 1]."""
    B, K, R, D = q_BKRD.shape
    S = k_BKDS.shape[-1]
    s_BKGTS = (_bmm(q_BKRD, k_BKDS) * (D ** -0.5)).reshape(B, K, G, R // G, S)
    if bias_BKTS is not None:
        s_BKGTS = s_BKGTS + bias_BKTS[:, :, None].astype(jnp.float32)
    s_BKGTS = jnp.where(mask_BKTS[:, :, None], s_BKGTS, NEG_INF)
    valid_BK1T1 = jnp.any(mask_BKTS, axis=-1, keepdims=True)[:, :, None]
    return s_BKGTS, valid_BK1T1


def _sum_to(x, like):
    """x summed over the dims where `like` broadcasts (size 1), in like's dtype."""
    axes = tuple(i for i, (a, b) in enumerate(zip(x.shape, like.shape)) if b == 1 and a != 1)
    return jnp.sum(x, axis=axes, keepdims=True).astype(like.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _core(q_BKRD, k_BKSD, v_BKSD, mask_BKTS, bias_BKTS, G):
    return _core_fwd(q_BKRD, k_BKSD, v_BKSD, mask_BKTS, bias_BKTS, G)[0]


def _core_fwd(q_BKRD, k_BKSD, v_BKSD, mask_BKTS, bias_BKTS, G):
    B, K, R, D = q_BKRD.shape
    s_BKGTS, valid_BK1T1 = _scores(q_BKRD, materialized_transpose(k_BKSD), mask_BKTS, bias_BKTS, G)
    # jax.nn.softmax's own steps (so the forward equals the reference), keeping the log-sum-exp for the backward.
    max_BKGT1 = jax.lax.stop_gradient(jnp.max(s_BKGTS, axis=-1, keepdims=True))
    e_BKGTS = jnp.exp(s_BKGTS - max_BKGT1)
    sum_BKGT1 = jnp.sum(e_BKGTS, axis=-1, keepdims=True)
    lse_BKGT1 = max_BKGT1 + jnp.log(sum_BKGT1)
    # Rows with nothing to attend to (padding) get zeros rather than a uniform average, as in the reference.
    p_BKGTS = jnp.where(valid_BK1T1, e_BKGTS / sum_BKGT1, 0.0)
    out_BKRD = _bmm(p_BKGTS.reshape(B, K, R, -1).astype(v_BKSD.dtype), v_BKSD)
    return out_BKRD, (q_BKRD, k_BKSD, v_BKSD, mask_BKTS, bias_BKTS, lse_BKGT1)


def _core_bwd(G, res, dout_BKRD):
    q_BKRD, k_BKSD, v_BKSD, mask_BKTS, bias_BKTS, lse_BKGT1 = res
    B, K, R, D = q_BKRD.shape
    dtype = q_BKRD.dtype
    s_BKGTS, valid_BK1T1 = _scores(q_BKRD, materialized_transpose(k_BKSD), mask_BKTS, bias_BKTS, G)
    p_BKGTS = jnp.where(valid_BK1T1, jnp.exp(s_BKGTS - lse_BKGT1), 0.0)
    S = p_BKGTS.shape[-1]
    p_BKRS = p_BKGTS.reshape(B, K, R, S)
    dout_c = dout_BKRD.astype(dtype)
    dv_BKSD = _bmm(materialized_transpose(p_BKRS.astype(dtype)), dout_c)
    dp_BKRS = _bmm(dout_c, materialized_transpose(v_BKSD))
    ds_BKRS = p_BKRS * (dp_BKRS - jnp.sum(p_BKRS * dp_BKRS, axis=-1, keepdims=True))
    dbias = None if bias_BKTS is None else _sum_to(ds_BKRS.reshape(B, K, G, R // G, S).sum(2), bias_BKTS)
    ds_c = (ds_BKRS * (D ** -0.5)).astype(dtype)
    dq_BKRD = _bmm(ds_c, k_BKSD)
    dk_BKSD = _bmm(materialized_transpose(ds_c), q_BKRD)
    return (dq_BKRD.astype(q_BKRD.dtype), dk_BKSD.astype(k_BKSD.dtype), dv_BKSD.astype(v_BKSD.dtype), None,
            dbias)


_core.defvjp(_core_fwd, _core_bwd)


def grouped_attention(q_BTHD: jax.Array, k_BSKD: jax.Array, v_BSKD: jax.Array, mask_BKTS: jax.Array,
                      bias_BKTS: Optional[jax.Array] = None) -> jax.Array:
    """model/attention.grouped_attention with the custom VJP; returns [B, T, H, D] in q's dtype."""
    B, T, H, D = q_BTHD.shape
    S, K = k_BSKD.shape[1], k_BSKD.shape[2]
    G = H // K
    q_BKRD = jnp.transpose(q_BTHD.reshape(B, T, K, G, D), (0, 2, 3, 1, 4)).reshape(B, K, G * T, D)
    k_BKSD, v_BKSD = _heads_major(k_BSKD), _heads_major(v_BSKD)
    out_BKRD = _core(q_BKRD, k_BKSD, v_BKSD, mask_BKTS, bias_BKTS, G)
    out_BTHD = jnp.transpose(out_BKRD.reshape(B, K, G, T, D), (0, 3, 1, 2, 4)).reshape(B, T, H, D)
    return out_BTHD.astype(q_BTHD.dtype)
