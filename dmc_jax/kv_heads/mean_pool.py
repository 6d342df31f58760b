"""Mean pooling, the GQA up-training init (Ainslie et al. 2023): a group's shared K/V head is the average of
the K and V projection weights of its t heads; queries and the output projection are unchanged.

Shape letters: L layers, D embed, H query heads, K KV heads, J new KV heads, t = K / J, Dh head dim.
"""

from __future__ import annotations

import numpy as np

from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params


def check_groups(cfg: ModelConfig, new_kv_heads: int) -> int:
    """t, the KV heads merged into one; ValueError unless new_kv_heads divides num_kv_heads."""
    if new_kv_heads < 1 or cfg.num_kv_heads % new_kv_heads:
        raise ValueError(f"new_kv_heads={new_kv_heads} must divide the model's num_kv_heads={cfg.num_kv_heads}")
    return cfg.num_kv_heads // new_kv_heads


def mean_pool(cfg: ModelConfig, params: Params, new_kv_heads: int) -> tuple[ModelConfig, Params]:
    """(cfg with new_kv_heads KV heads, params with k/v averaged over each group of t adjacent heads)."""
    t = check_groups(cfg, new_kv_heads)
    layers = dict(params["layers"])
    for name in ("k", "v"):
        w_LDKD = np.asarray(layers[name])
        L, D, K, Dh = w_LDKD.shape
        layers[name] = w_LDKD.reshape(L, D, new_kv_heads, t, Dh).mean(axis=3)
    return cfg.replace(num_kv_heads=new_kv_heads), {**params, "layers": layers}
