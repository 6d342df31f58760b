"""Next-token sampling: greedy, temperature, top-k and top-p (nucleus), jit-friendly.

Shape letters: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dmc_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k 0 and top_p 1 disable those filters."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise UserError(f"generate.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"generate.top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"generate.top_p must be in (0, 1] (1 = off), got {self.top_p}")


def sample(logits_BV: jax.Array, rng: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Token ids [B] drawn from logits_BV under cfg."""
    if cfg.temperature == 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0:
        kth_B1 = jax.lax.top_k(logits_BV, cfg.top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if cfg.top_p < 1.0:
        sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p.
        mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
        keep_BV = mass_before_BV < cfg.top_p
        cutoff_B1 = jnp.min(jnp.where(keep_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(rng, logits_BV, axis=-1).astype(jnp.int32)
