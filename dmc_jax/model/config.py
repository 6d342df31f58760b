"""The architecture of a Llama-family model: a frozen, hashable dataclass (a static argument under jit)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp

from dmc_jax.errors import UserError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style RoPE frequency scaling (rope_type 'llama3' in Hugging Face configs)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Llama family: RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA, tied or untied embeddings; qk_norm adds Qwen3's per-head
    RMSNorm of q and k (before RoPE); dms_adapter adds a DMS decision adapter per layer (dmc_jax/dms/decisions.py:
    its own RMSNorm of the layer's input, then a linear map to one logit per KV head)."""

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qk_norm: bool = False
    dms_adapter: bool = False
    max_seq_len: int = 4096
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat: bool = False
    remat_policy: str = ""  # '' = 'full' if remat else 'none'; names in dmc_jax/model/remat.py
    bos_id: Optional[int] = None
    eos_id: Optional[int] = None

    def __post_init__(self):
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim",
                     "max_seq_len"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads "
                            f"({self.num_kv_heads})")
        if self.head_dim % 2:
            raise UserError(f"model.head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("param_dtype", "compute_dtype"):
            if getattr(self, name) not in DTYPES:
                raise UserError(f"model.{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def dtype(self):
        """Compute dtype (activations, KV cache)."""
        return DTYPES[self.compute_dtype]

    @property
    def pdtype(self):
        """Parameter dtype."""
        return DTYPES[self.param_dtype]

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        d, f, l = self.embed_dim, self.mlp_dim, self.num_layers
        attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = (attn + 3 * d * f + 2 * d + (2 * self.head_dim if self.qk_norm else 0)
                     + (d * (self.num_kv_heads + 1) if self.dms_adapter else 0))
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + l * per_layer + d + head


def tiny_config(**overrides) -> ModelConfig:
    """A small random model for tests and examples (GQA 4:2)."""
    base = dict(vocab_size=256, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                rope_theta=10000.0, max_seq_len=256, tie_embeddings=False)
    base.update(overrides)
    return ModelConfig(**base)
