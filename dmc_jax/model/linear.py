"""The model's weight matmuls (q/k/v/o, MLP, logits) in a compute dtype, with a backward of canonical matmuls.

Shape letters: M rows (batch x time), K contracted width, N output width.

`dense(x, w, dtype)` contracts the trailing dims of x with the leading dims of w, operands cast to `dtype`
(bf16 or fp32), accumulation in fp32. XLA:CPU sends a dot to its fast library (YNNPACK; bf16 x bf16 -> fp32 on
avx512_bf16 / AMX) only when the dot is canonical: lhs [M, K] contracting its last dim, rhs [K, N] its first.
Autodiff of `x @ w` produces the weight gradient as a contraction over the rows of both operands, which XLA:CPU
runs either upcast to fp32 or in its generic bf16 kernel (measured on SmolLM2's MLP, 2-core AVX-512 CPU: 50
GFLOP/s against 500-800 canonical). The custom VJP writes both backward contractions as canonical matmuls
over explicitly transposed operands: dX = G @ W^T (the transpose fused into the cast of the fp32 master weight)
and dW = X^T @ G, returned in fp32 (the master weight's dtype) without a bf16 round trip.

The custom VJP is used on the CPU backend (or when forced with `canonical=True`); elsewhere `dense` is a plain
einsum with preferred fp32 accumulation, whose autodiff GPU/TPU compilers already map onto their matrix units.
Both paths compute the same contractions in the same dtypes.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp


def use_canonical(canonical: Optional[bool] = None) -> bool:
    """Whether dense() takes the custom-VJP path: `canonical` when given, else True on the CPU backend."""
    return jax.default_backend() == "cpu" if canonical is None else canonical


def materialized_transpose(a_RC: jax.Array) -> jax.Array:
    """a^T [..., C, R] (the last two dims swapped), materialized rather than folded into the consuming dot.

    XLA emits a plain transpose as a layout change, which XLA:CPU folds into the dot as a non-canonical
    contraction (the slow path this module avoids). Transposing a view with the row dim split in two and then
    reshaping needs a physical copy, so the dot reads a row-major [..., C, R] operand.
    """
    *lead, R, C = a_RC.shape
    f = 2 if R % 2 == 0 else 1
    n = len(lead)
    split = a_RC.reshape(*lead, f, R // f, C)
    return jnp.transpose(split, (*range(n), n + 2, n, n + 1)).reshape(*lead, C, R)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul(x_MK: jax.Array, w_KN: jax.Array, dtype, out_dtype) -> jax.Array:
    """x @ w with operands in dtype, fp32 accumulation, result in out_dtype."""
    return _matmul_fwd(x_MK, w_KN, dtype, out_dtype)[0]


def _pad_rows(x_MK: jax.Array, rows: int) -> jax.Array:
    """x with zero rows appended up to `rows` (no-op when it has as many)."""
    M = x_MK.shape[0]
    return x_MK if M >= rows else jnp.concatenate([x_MK, jnp.zeros((rows - M, x_MK.shape[1]), x_MK.dtype)])


def _matmul_fwd(x_MK, w_KN, dtype, out_dtype):
    x_MK_c = x_MK.astype(dtype)
    M = x_MK.shape[0]
    # One row (decode at batch 1) is a matrix-vector product, which XLA:CPU keeps out of its matmul library (and
    # runs in bf16 at a tenth of fp32's speed); a zero second row keeps it a bf16 matmul that reads w once.
    y_MN = jnp.dot(_pad_rows(x_MK_c, 2), w_KN.astype(dtype), preferred_element_type=jnp.float32)[:M].astype(out_dtype)
    # Residuals: the cast activations (what the weight gradient reads) and the master weight itself (already live;
    # the backward re-casts it fused with its transpose). x's dtype is carried as a zero-size array.
    return y_MN, (x_MK_c, w_KN, jnp.zeros((0,), x_MK.dtype))


def _matmul_bwd(dtype, out_dtype, res, g_MN):
    x_MK_c, w_KN, x_like = res
    g_MN = g_MN.astype(dtype)
    w_NK = materialized_transpose(w_KN.astype(dtype))
    dx_MK = jnp.dot(g_MN, w_NK, preferred_element_type=jnp.float32).astype(x_like.dtype)
    dw_KN = jnp.dot(materialized_transpose(x_MK_c), g_MN, preferred_element_type=jnp.float32).astype(w_KN.dtype)
    return dx_MK, dw_KN


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def dense(x: jax.Array, w: jax.Array, dtype, n_in: int = 1, out_dtype=None,
          canonical: Optional[bool] = None) -> jax.Array:
    """x [..., *w.shape[:n_in]] contracted with w [*in, *out] -> [..., *out]; operands in dtype, fp32 accumulation.

    The result is in out_dtype (default: dtype). n_in is the number of contracted dims (2 for the attention
    output projection [H, Dh, D]).
    """
    out_dtype = dtype if out_dtype is None else out_dtype
    in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
    if x.shape[x.ndim - n_in:] != in_shape:
        raise ValueError(f"dense: x {x.shape} does not end with w's input dims {in_shape}")
    lead = x.shape[:x.ndim - n_in]
    K, N = math.prod(in_shape), math.prod(out_shape)
    if use_canonical(canonical):
        y = _matmul(x.reshape(-1, K), w.reshape(K, N), dtype, out_dtype)
    else:
        y = jnp.dot(x.reshape(-1, K).astype(dtype), w.reshape(K, N).astype(dtype),
                    preferred_element_type=jnp.float32).astype(out_dtype)
    return y.reshape(*lead, *out_shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _matmul_nt(x_MK: jax.Array, w_NK: jax.Array, dtype, out_dtype) -> jax.Array:
    """x @ w^T with operands in dtype, fp32 accumulation, result in out_dtype."""
    return _matmul_nt_fwd(x_MK, w_NK, dtype, out_dtype)[0]


SMALL_M = 64  # up to this many rows (decode, the last prompt token) _matmul_nt reads w in place


def _matmul_nt_fwd(x_MK, w_NK, dtype, out_dtype):
    x_MK_c = x_MK.astype(dtype)
    M = x_MK.shape[0]
    if M <= SMALL_M:
        # Decode: (w x^T)^T, so the [N, K] weight (the tied embedding, 28M values in SmolLM2) is read in place
        # instead of transposed at every step. Rows padded to a multiple of 4 (>= 4) so that x^T stays a matmul
        # operand of its own (see materialized_transpose) and not a matrix-vector product.
        rows = max(4, -(-M // 4) * 4)
        xt_KR = materialized_transpose(_pad_rows(x_MK_c, rows))
        y_NR = jnp.dot(w_NK.astype(dtype), xt_KR, preferred_element_type=jnp.float32)
        y_MN = materialized_transpose(y_NR)[:M].astype(out_dtype)  # a plain transpose would be folded back
    else:
        y_MN = jnp.dot(x_MK_c, materialized_transpose(w_NK.astype(dtype)),
                       preferred_element_type=jnp.float32).astype(out_dtype)
    return y_MN, (x_MK_c, w_NK, jnp.zeros((0,), x_MK.dtype))


def _matmul_nt_bwd(dtype, out_dtype, res, g_MN):
    x_MK_c, w_NK, x_like = res
    g_MN = g_MN.astype(dtype)
    dx_MK = jnp.dot(g_MN, w_NK.astype(dtype), preferred_element_type=jnp.float32).astype(x_like.dtype)
    # dW [N, K] directly (not dW^T then a transpose): XLA would fold that transpose into a non-canonical dot.
    dw_NK = jnp.dot(materialized_transpose(g_MN), x_MK_c, preferred_element_type=jnp.float32).astype(w_NK.dtype)
    return dx_MK, dw_NK


_matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


def dense_transposed(x: jax.Array, w_ND: jax.Array, dtype, out_dtype=None,
                     canonical: Optional[bool] = None) -> jax.Array:
    """x [..., D] @ w_ND^T -> [..., N] (tied embeddings as the output projection); like dense(x, w_ND.T)."""
    out_dtype = dtype if out_dtype is None else out_dtype
    N, D = w_ND.shape
    if x.shape[-1] != D:
        raise ValueError(f"dense_transposed: x {x.shape} does not end with w's last dim {D}")
    lead = x.shape[:-1]
    if use_canonical(canonical):
        y = _matmul_nt(x.reshape(-1, D), w_ND, dtype, out_dtype)
    else:
        y = jnp.dot(x.reshape(-1, D).astype(dtype), w_ND.astype(dtype).T,
                    preferred_element_type=jnp.float32).astype(out_dtype)
    return y.reshape(*lead, N)
