"""Partial accumulations: each position's key/value is the omega-weighted mean of its current run.

x^_t = sum_{j<=t} C_{j,t} omega_j x_j / sum_{j<=t} C_{j,t} omega_j, with C_{j,t} = prod_{u=j+1..t} alpha_u (and,
with a window w, only j > t - w). Computed in fp32, in parallel over time:
- unbounded: Z_t = alpha_t Z_{t-1} + omega_t and x^_t = (1 - r_t) x^_{t-1} + r_t x_t with r_t = omega_t / Z_t,
  both linear recurrences evaluated with `jax.lax.associative_scan`;
- window w: a banded sum over the w offsets (a static loop over offsets, never over time).
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
    xs = tuple(x.astype(jnp.float32) for x in xs)
    if window is None:
        z_BTK = _linear_scan(alpha_BTK, omega_BTK)
        r_BTK1 = (omega_BTK / z_BTK)[..., None]
        return tuple(_linear_scan(1.0 - r_BTK1, r_BTK1 * x) for x in xs)
    T = alpha_BTK.shape[1]
    w = min(window, T)
    # weight of token t - d in position t's slot: P_{t,d} omega_{t-d}, P_{t,0} = 1, P_{t,d} = P_{t,d-1} alpha_{t-d+1}
    weights, p_BTK = [], jnp.ones_like(alpha_BTK)
    for d in range(w):
        if d > 0:
            p_BTK = p_BTK * _shift(alpha_BTK, d - 1)
        weights.append(p_BTK * _shift(omega_BTK, d))
    z_BTK = sum(weights[1:], weights[0])
    outs = []
    for x in xs:
        acc = None
        for d, w_BTK in enumerate(weights):
            term = (w_BTK / z_BTK)[..., None] * _shift(x, d)
            acc = term if acc is None else acc + term
        outs.append(acc)
    return tuple(outs)
