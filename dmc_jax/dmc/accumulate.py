"""Partial accumulations: each position's key/value is the omega-weighted mean of its current run.

x^_t = sum_{j<=t} C_{j,t} omega_j x_j / sum_{j<=t} C_{j,t} omega_j, with C_{j,t} = prod_{u=j+1..t} alpha_u (and,
with a window w, only j > t - w). Computed in fp32, in parallel over time:
- unbounded: Z_t = alpha_t Z_{t-1} + omega_t and x^_t = (1 - r_t) x^_{t-1} + r_t x_t with r_t = omega_t / Z_t,
  both linear recurrences evaluated with `jax.lax.associative_scan`;
- window w: the unbounded means corrected by what fell out of the window (the same subtraction the inference
  cache's ring buffer does), which costs a few elementwise passes instead of w.
Both are written as convex combinations so that alpha_t = 0 gives x^_t = x_t bitwise (DMC with every decision
"append" is exactly the vanilla model).

Shape letters: B batch, T time, K KV heads, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def _linear_scan(a_BTK1: jax.Array, b_BTKD: jax.Array) -> jax.Array:
    """y_t = a_t y_{t-1} + b_t (y_{-1} = 0) along T."""
    def combine(left, right):
        a_l, b_l = left
        a_r, b_r = right
        return a_l * a_r, a_r * b_l + b_r

    return jax.lax.associative_scan(combine, (a_BTK1, b_BTKD), axis=1)[1]


def _shift(x_BT, d: int):
    """x delayed by d steps along T (zeros enter at the front)."""
    if d == 0:
        return x_BT
    pad = [(0, 0)] * x_BT.ndim
    pad[1] = (d, 0)
    return jnp.pad(x_BT[:, :-d], pad)


def accumulate(alpha_BTK: jax.Array, omega_BTK: jax.Array, xs: tuple, window: Optional[int]) -> tuple:
    """Partial accumulations (fp32) of each x_BTKD in xs under decisions alpha and importances omega."""
    alpha_BTK = alpha_BTK.astype(jnp.float32)
    omega_BTK = omega_BTK.astype(jnp.float32)
    z_BTK = _linear_scan(alpha_BTK, omega_BTK)
    r_BTK1 = (omega_BTK / z_BTK)[..., None]
    means = tuple(_linear_scan(1.0 - r_BTK1, r_BTK1 * x.astype(jnp.float32)) for x in xs)
    if window is None or window >= alpha_BTK.shape[1]:
        return means
    # Drop what fell out of the window: tokens j <= t - w weigh C_{t-w,t} = alpha_t ... alpha_{t-w+1} times their
    # weight at t - w, so the windowed mean is the full mean moved away from the mean at t - w:
    #   x^w_t = x^_t + rho_t (x^_t - x^_{t-w}),  rho_t = C_{t-w,t} Z_{t-w} / (Z_t - C_{t-w,t} Z_{t-w}).
    # An append inside the window makes C = 0, rho = 0 and x^w_t = x^_t exactly.
    c_BTK = alpha_BTK
    for d in range(1, window):
        c_BTK = c_BTK * _shift(alpha_BTK, d)
    dropped_BTK = c_BTK * _shift(z_BTK, window)
    rho_BTK1 = (dropped_BTK / jnp.maximum(z_BTK - dropped_BTK, omega_BTK))[..., None]
    return tuple(m + rho_BTK1 * (m - _shift(m, window)) for m in means)
