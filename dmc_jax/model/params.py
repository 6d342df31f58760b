"""The parameter pytree of a Llama model: shapes, logical axis names and initializers, declared once.

Layout (L layers, D embed, H query heads, K kv heads, Dh head dim, F mlp, V vocab). Per-layer weights are
stacked on a leading `layers` axis so the forward pass can `jax.lax.scan` over them.

    embed/embedding        V x D          (vocab, embed)
    layers/attn_norm       L x D          (layers, embed)
    layers/q               L x D x H x Dh (layers, embed, heads, head_dim)
    layers/k               L x D x K x Dh (layers, embed, kv_heads, head_dim)
    layers/v               L x D x K x Dh (layers, embed, kv_heads, head_dim)
    layers/o               L x H x Dh x D (layers, heads, head_dim, embed)
    layers/mlp_norm        L x D          (layers, embed)
    layers/q_norm          L x Dh         (layers, head_dim)  only with cfg.qk_norm (Qwen3), shared by all heads
    layers/k_norm          L x Dh         (layers, head_dim)  only with cfg.qk_norm
    layers/dms_adapter_norm L x D         (layers, embed)     only with cfg.dms_adapter: DMS decision adapter
    layers/dms_adapter     L x D x K      (layers, embed, kv_heads)  (dmc_jax/dms/decisions.py; initialized to 0)
    layers/gate            L x D x F      (layers, embed, mlp)
    layers/up              L x D x F      (layers, embed, mlp)
    layers/down            L x F x D      (layers, mlp, embed)
    final_norm             D              (embed,)
    lm_head                D x V          (embed, vocab)    absent when embeddings are tied

q/k use the Hugging Face (rotate-half) RoPE layout. Parameters are created as Flax `nn.LogicallyPartitioned`
boxes so sharding rules can map logical names to mesh axes later (`logical_axes`, `unbox`).
"""

from __future__ import annotations

from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from dmc_jax.model.config import ModelConfig

Params = Dict[str, Any]


def param_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """Flat 'path' -> (shape, logical axes) for every parameter of cfg."""
    L, D, H, K, Dh, F, V = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                            cfg.mlp_dim, cfg.vocab_size)
    spec = {
        "embed/embedding": ((V, D), ("vocab", "embed")),
        "layers/attn_norm": ((L, D), ("layers", "embed")),
        "layers/q": ((L, D, H, Dh), ("layers", "embed", "heads", "head_dim")),
        "layers/k": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/v": ((L, D, K, Dh), ("layers", "embed", "kv_heads", "head_dim")),
        "layers/o": ((L, H, Dh, D), ("layers", "heads", "head_dim", "embed")),
        "layers/mlp_norm": ((L, D), ("layers", "embed")),
        "layers/gate": ((L, D, F), ("layers", "embed", "mlp")),
        "layers/up": ((L, D, F), ("layers", "embed", "mlp")),
        "layers/down": ((L, F, D), ("layers", "mlp", "embed")),
        "final_norm": ((D,), ("embed",)),
    }
    if cfg.qk_norm:
        spec["layers/q_norm"] = ((L, Dh), ("layers", "head_dim"))
        spec["layers/k_norm"] = ((L, Dh), ("layers", "head_dim"))
    if cfg.dms_adapter:
        spec["layers/dms_adapter_norm"] = ((L, D), ("layers", "embed"))
        spec["layers/dms_adapter"] = ((L, D, K), ("layers", "embed", "kv_heads"))
    if not cfg.tie_embeddings:
        spec["lm_head"] = ((D, V), ("embed", "vocab"))
    return spec


def _fan_in(path: str, shape: tuple) -> int:
    if path in ("layers/o",):
        return shape[-3] * shape[-2]
    if path == "embed/embedding":
        return 1
    return shape[-3] if path in ("layers/q", "layers/k", "layers/v") else shape[-2]


def unflatten(flat: Dict[str, Any]) -> Params:
    """{'a/b': x} -> {'a': {'b': x}}."""
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: Params, prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def init_params(cfg: ModelConfig, rng: jax.Array, boxed: bool = False) -> Params:
    """Random parameters (norm scales = 1, weights ~ N(0, 1/fan_in)); boxed=True keeps the logical-axis boxes."""
    spec = param_shapes(cfg)
    keys = jax.random.split(rng, len(spec))
    flat = {}
    for key, (path, (shape, axes)) in zip(keys, sorted(spec.items())):
        if path.endswith("norm"):
            init = nn.initializers.ones
        elif path == "layers/dms_adapter":  # decisions start at a = -offset: nothing evicted (as the reference)
            init = nn.initializers.zeros
        else:
            init = nn.initializers.normal(stddev=_fan_in(path, shape) ** -0.5)
        value = nn.with_logical_partitioning(init, axes)(key, shape, cfg.pdtype)
        flat[path] = value if boxed else nn.unbox(value)
    return unflatten(flat)


def logical_axes(cfg: ModelConfig) -> Params:
    """The pytree of logical axis names matching init_params(cfg) (a PartitionSpec of names per leaf)."""
    return unflatten({path: jax.sharding.PartitionSpec(*axes) for path, (_, axes) in param_shapes(cfg).items()})


def check_params(cfg: ModelConfig, params: Params) -> None:
    """Raises ValueError naming the first parameter whose path or shape disagrees with cfg."""
    flat = flatten(params)
    spec = param_shapes(cfg)
    missing = sorted(set(spec) - set(flat))
    extra = sorted(set(flat) - set(spec))
    if missing or extra:
        raise ValueError(f"parameter tree does not match the config: missing {missing}, unexpected {extra}")
    for path, (shape, _) in spec.items():
        if tuple(flat[path].shape) != tuple(shape):
            raise ValueError(f"parameter {path} has shape {tuple(flat[path].shape)}, config expects {shape}")


def cast(params: Params, dtype) -> Params:
    return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
