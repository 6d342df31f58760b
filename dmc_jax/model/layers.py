"""Shared numerics of a Llama block: RMSNorm, rotary position embedding (with Llama 3 scaling), SwiGLU.

Shape letters: B batch, T time (query positions), N any number of heads, D model width, Dh head dim, F mlp width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from dmc_jax.model.config import ModelConfig, RopeScaling
from dmc_jax.model.linear import dense


def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in fp32, returned in the input dtype."""
    x32 = x_BTD.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> jax.Array:
    """Inverse frequencies [Dh/2] in fp32, with Llama 3 frequency scaling when `scaling` is set."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed down by `factor`, short ones kept, and the band between the two
    # cut-offs interpolated smoothly in 1/wavelength.
    old_len = scaling.original_max_position_embeddings
    wavelen = 2.0 * math.pi / inv_freq
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1.0 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_BTND: jax.Array, positions_BT: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotates pairs (i, i + Dh/2) of every head by position * inv_freq[i] (Hugging Face rotate-half layout)."""
    angles_BTF = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BTF)[:, :, None, :]
    sin = jnp.sin(angles_BTF)[:, :, None, :]
    x32 = x_BTND.astype(jnp.float32)
    half = x32.shape[-1] // 2
    x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTND.dtype)


class Rope:
    """RoPE of one model, handed to cache methods so they decide when keys are rotated (DMC rotates averages)."""

    def __init__(self, cfg: ModelConfig):
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)

    def __call__(self, x_BTND: jax.Array, positions_BT: jax.Array) -> jax.Array:
        return apply_rope(x_BTND, positions_BT, self.inv_freq)


def swiglu(x_BTD: jax.Array, gate_DF: jax.Array, up_DF: jax.Array, down_FD: jax.Array, dtype=None) -> jax.Array:
    """down(silu(x gate) * (x up)), matmuls in dtype (default x's) with fp32 accumulation (linear.dense)."""
    dtype = x_BTD.dtype if dtype is None else dtype
    h_BTF = jax.nn.silu(dense(x_BTD, gate_DF, dtype)) * dense(x_BTD, up_DF, dtype)
    return dense(h_BTF, down_FD, dtype)
