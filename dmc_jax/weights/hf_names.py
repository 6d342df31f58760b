"""The one mapping between our parameter pytree and Hugging Face Llama / Qwen3 tensors and config.json.

Letters: L layers, D embed, H query heads, K kv heads, Dh head dim, F mlp, V vocab. Hugging Face stores
linear weights as [out, in]; we store [in, ...out] (see dmc_jax/model/params.py), so most tensors are a
reshape plus a transpose. Both sides use the rotate-half RoPE layout for q/k: no row permutation here.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

from dmc_jax.dms import hf_config as dms_hf_config
from dmc_jax.errors import UserError
from dmc_jax.model.config import DTYPES, ModelConfig, RopeScaling
from dmc_jax.model.params import Params, flatten, param_shapes, unflatten

# our flat path -> (Hugging Face name, number of leading "in" axes of ours; 0 = stored as is). HF keeps a
# linear as [out, in]; ours is [in..., out...], so HF = ours.reshape(prod(in), prod(out)).T.
GLOBAL_NAMES = {
    "embed/embedding": ("model.embed_tokens.weight", 0),
    "final_norm": ("model.norm.weight", 0),
    "lm_head": ("lm_head.weight", 1),
}
# our stacked per-layer path -> (HF name inside model.layers.{i}., leading "in" axes of one layer's slice)
LAYER_NAMES = {
    "layers/attn_norm": ("input_layernorm.weight", 0),
    "layers/q": ("self_attn.q_proj.weight", 1),
    "layers/k": ("self_attn.k_proj.weight", 1),
    "layers/v": ("self_attn.v_proj.weight", 1),
    "layers/o": ("self_attn.o_proj.weight", 2),
    "layers/mlp_norm": ("post_attention_layernorm.weight", 0),
    "layers/gate": ("mlp.gate_proj.weight", 1),
    "layers/up": ("mlp.up_proj.weight", 1),
    "layers/down": ("mlp.down_proj.weight", 1),
    "layers/q_norm": ("self_attn.q_norm.weight", 0),  # Qwen3 only (cfg.qk_norm)
    "layers/k_norm": ("self_attn.k_norm.weight", 0),
    # DMS decision adapter (cfg.dms_adapter; NVIDIA Model-Optimizer's dms_separate_alpha=true): [K, D] and [D]
    "layers/dms_adapter": ("self_attn.dms_proj_alpha.weight", 1),
    "layers/dms_adapter_norm": ("self_attn.dms_proj_alpha_norm.weight", 0),
}
# model_type -> (our qk_norm, the architecture transformers builds); both are the same decoder otherwise
MODEL_TYPES = {"llama": (False, "LlamaForCausalLM"), "qwen3": (True, "Qwen3ForCausalLM")}
# HF tensors that carry no parameters (old checkpoints saved RoPE buffers)
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def layer_name(i: int, name: str) -> str:
    return f"model.layers.{i}.{name}"


def _hf_shape(our_shape: tuple, n_in: int) -> tuple:
    """[in..., out...] -> [prod(out), prod(in)] for linears (n_in > 0); unchanged otherwise."""
    if not n_in:
        return tuple(our_shape)
    return (int(np.prod(our_shape[n_in:])), int(np.prod(our_shape[:n_in])))


def _entries(cfg: ModelConfig):
    """Yields (our path, layer index or None, HF name, our per-tensor shape, leading "in" axes)."""
    spec = param_shapes(cfg)
    for path, (name, n_in) in GLOBAL_NAMES.items():
        if path in spec:
            yield path, None, name, spec[path][0], n_in
    for path, (name, n_in) in LAYER_NAMES.items():
        if path not in spec:
            continue
        for i in range(cfg.num_layers):
            yield path, i, layer_name(i, name), spec[path][0][1:], n_in


def hf_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """HF tensor name -> shape for every tensor of cfg (lm_head absent when embeddings are tied)."""
    return {name: _hf_shape(shape, t) for _, _, name, shape, t in _entries(cfg)}


def _transpose_into(src_AxB: np.ndarray, dst_BxA: np.ndarray, block: int = 64) -> None:
    """dst = src.T, copied in row blocks (cache friendly: ~10x faster than numpy's strided copy)."""
    for j in range(0, src_AxB.shape[0], block):
        dst_BxA[:, j:j + block] = src_AxB[j:j + block].T


def _our_to_hf(w: np.ndarray, n_in: int) -> np.ndarray:
    if not n_in:
        return np.ascontiguousarray(w)
    w_IxO = np.ascontiguousarray(w).reshape(int(np.prod(w.shape[:n_in])), -1)  # a view: w is contiguous
    out_OxI = np.empty(w_IxO.shape[::-1], w_IxO.dtype)
    _transpose_into(w_IxO, out_OxI)
    return out_OxI


def hf_sources(cfg: ModelConfig, params: Params) -> Dict[str, tuple]:
    """{HF name: (our array or layer slice, leading "in" axes)}: what `hf_tensor` turns into that HF tensor. The
    writer makes one shard's tensors at a time from these, so exporting never holds a second copy of the model."""
    flat = {k: np.asarray(v) for k, v in flatten(params).items()}
    return {name: (flat[path] if i is None else flat[path][i], n_in) for path, i, name, _, n_in in _entries(cfg)}


def hf_tensor(source: tuple) -> np.ndarray:
    """The HF tensor of one hf_sources entry (a transposed copy for linears)."""
    return _our_to_hf(*source)


def to_hf(cfg: ModelConfig, params: Params) -> Dict[str, np.ndarray]:
    """Our params -> {HF name: array} (dtype kept; lm_head omitted when tied, as transformers saves it)."""
    return {name: hf_tensor(src) for name, src in hf_sources(cfg, params).items()}


def from_hf(cfg: ModelConfig, tensors: Mapping[str, Any], source: str = "checkpoint") -> Params:
    """{HF name: array} -> our params; UserError naming a missing, misshapen or unexpected tensor."""
    expected = hf_shapes(cfg)
    ignorable = {"lm_head.weight"} if cfg.tie_embeddings else set()
    unexpected = sorted(n for n in tensors if n not in expected and n not in ignorable
                        and not n.endswith(_IGNORED_SUFFIXES))
    if unexpected:
        raise UserError(f"{source} has tensors a Llama model does not use ({', '.join(unexpected[:3])}"
                        f"{', ...' if len(unexpected) > 3 else ''}); dmc_jax loads plain Llama-family models")
    for name, shape in expected.items():
        if name not in tensors:
            raise UserError(f"{source} is missing tensor {name}; the checkpoint is incomplete or not a "
                            f"Llama model with this config")
        got = tuple(tensors[name].shape)
        if got != shape:
            raise UserError(f"{source} tensor {name} has shape {got} but the config implies {shape}; "
                            f"config and weights disagree")
    flat: Dict[str, np.ndarray] = {}
    spec = param_shapes(cfg)
    for path, i, name, our_shape, n_in in _entries(cfg):
        w = np.asarray(tensors[name])
        if path not in flat:
            flat[path] = np.empty(spec[path][0], w.dtype)
        dst = flat[path] if i is None else flat[path][i]
        if n_in:
            _transpose_into(w, np.reshape(dst, (int(np.prod(our_shape[:n_in])), -1), copy=False))
        else:
            dst[...] = w
    return unflatten(flat)


def _first(value):
    """bos/eos ids may be lists in HF configs: the first one is the model's own."""
    if isinstance(value, (list, tuple)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def _rope_scaling(d: Mapping[str, Any]):
    """(rope_theta, RopeScaling or None) from rope_theta/rope_scaling or transformers-5 rope_parameters."""
    params = d.get("rope_parameters") or {}
    theta = d.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = d.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if not scaling:
        return float(theta), None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind != "llama3":
        raise UserError(f"config.json rope scaling type {kind!r} is not supported; dmc_jax supports none or "
                        f"'llama3'")
    fields = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    missing = [f for f in fields if f not in scaling]
    if missing:
        raise UserError(f"config.json llama3 rope scaling lacks {', '.join(missing)}; add them to rope_scaling")
    return float(theta), RopeScaling(float(scaling["factor"]), float(scaling["low_freq_factor"]),
                                     float(scaling["high_freq_factor"]),
                                     int(scaling["original_max_position_embeddings"]))


def config_from_hf(d: Mapping[str, Any]) -> ModelConfig:
    """A Hugging Face Llama or Qwen3 config.json dict -> ModelConfig; UserError for other architectures."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise UserError(f"config.json has model_type {model_type!r}; dmc_jax loads Llama-family models only "
                        f"(model_type {' or '.join(repr(t) for t in MODEL_TYPES)})")
    if d.get("use_sliding_window") or any(t != "full_attention" for t in d.get("layer_types") or ()):
        raise UserError("config.json sets use_sliding_window=true; dmc_jax supports full attention only")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in d:
            raise UserError(f"config.json lacks {key!r}; it is not a complete Llama config")
    if d.get("hidden_act", "silu") != "silu":
        raise UserError(f"config.json hidden_act {d['hidden_act']!r} is not supported; Llama uses 'silu'")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            raise UserError(f"config.json sets {key}=true; dmc_jax supports Llama models without biases")
    dms_adapter = dms_hf_config.has_adapter(d)  # a DMS field we cannot honour fails here, before the tensors do
    try:
        theta, scaling = _rope_scaling(d)
        heads = int(d["num_attention_heads"])
        head_dim = d.get("head_dim") or int(d["hidden_size"]) // heads
        dtype = d.get("torch_dtype", d.get("dtype"))
        return ModelConfig(
            vocab_size=int(d["vocab_size"]), embed_dim=int(d["hidden_size"]), num_layers=int(d["num_hidden_layers"]),
            num_heads=heads, num_kv_heads=int(d.get("num_key_value_heads") or heads), head_dim=int(head_dim),
            mlp_dim=int(d["intermediate_size"]), rope_theta=theta, rope_scaling=scaling,
            norm_eps=float(d.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=MODEL_TYPES[model_type][0], dms_adapter=dms_adapter,
            max_seq_len=int(d.get("max_position_embeddings", 2048)),
            param_dtype=dtype if dtype in DTYPES else "float32",
            bos_id=_first(d.get("bos_token_id")), eos_id=_first(d.get("eos_token_id")))
    except (TypeError, ValueError, ZeroDivisionError) as e:  # a field of the wrong type: "x", null, 0 heads
        raise UserError(f"config.json has a field of the wrong type ({type(e).__name__}: {e}); fix or re-download "
                        f"it") from None


def config_to_hf(cfg: ModelConfig, dtype: str | None = None) -> Dict[str, Any]:
    """ModelConfig -> a config.json dict transformers' LlamaForCausalLM (Qwen3ForCausalLM with qk_norm) accepts."""
    scaling = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        scaling = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                   "high_freq_factor": s.high_freq_factor,
                   "original_max_position_embeddings": s.original_max_position_embeddings}
    model_type = "qwen3" if cfg.qk_norm else "llama"
    return {
        "architectures": [MODEL_TYPES[model_type][1]], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.embed_dim, "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
        "rope_scaling": scaling, "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1,
        "use_cache": True, "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_id,
        "torch_dtype": dtype or cfg.param_dtype,
        **({"dms_separate_alpha": True} if cfg.dms_adapter else {}),  # the adapter's tensors are declared
    }
