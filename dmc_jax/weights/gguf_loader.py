"""Loads a llama.cpp GGUF file (Llama architecture) into our config and parameter pytree.

GGUF tensor names are translated to Hugging Face names and then go through `hf_names.from_hf`, the one
mapping to our layout. llama.cpp's converter permuted the q/k rows of each head for interleaved-pair RoPE
(GGUF row 2*i + s is HF row s*Dh/2 + i); `unpermute_rows` undoes it. Dequantized shapes are numpy order,
the reverse of GGUF's `ne` order, which for 2-D weights is exactly Hugging Face's [out, in].
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Tuple

import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig, RopeScaling
from dmc_jax.model.params import Params
from dmc_jax.weights import hf_names

# GGUF name -> HF name ({i} is the layer); llama.cpp's own names for Llama tensors
_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
# types gguf.quants can dequantize that llama.cpp uses for Llama weights
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                   "Q6_K")


def hf_name(gguf_name: str) -> str | None:
    """GGUF tensor name -> Hugging Face name, or None for names outside the Llama layout."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER:
        return hf_names.layer_name(int(m.group(1)), _LAYER[m.group(2)] + ".weight")
    return None


def unpermute_rows(w_RxD: np.ndarray, num_heads: int) -> np.ndarray:
    """GGUF interleaved-pair q/k rows -> HF rotate-half rows: within a head, row 2*i + s -> s*Dh/2 + i."""
    rows, d = w_RxD.shape
    half = rows // num_heads // 2
    return w_RxD.reshape(num_heads, half, 2, d).swapaxes(1, 2).reshape(rows, d)


def permute_rows(w_RxD: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of unpermute_rows (HF rotate-half -> GGUF interleaved), as llama.cpp's converter does."""
    rows, d = w_RxD.shape
    half = rows // num_heads // 2
    return w_RxD.reshape(num_heads, 2, half, d).swapaxes(1, 2).reshape(rows, d)


def open_gguf(path: str):
    """A gguf.GGUFReader for path; UserError (one line) for a missing, unreadable or corrupt file."""
    import gguf

    if not os.path.exists(path):
        raise UserError(f"GGUF file {path} does not exist; check the path")
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file; give the path of a .gguf file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncated or foreign files
        reason = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"{path} is not a valid GGUF file ({reason}); it may be truncated or corrupt, "
                        f"re-download it") from None


def gguf_metadata(reader) -> Dict[str, Any]:
    """All key/value fields of a GGUF file as plain Python values (strings, numbers, lists)."""
    meta = {}
    for name, field in reader.fields.items():
        try:
            meta[name] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we use
            continue
    return meta


def _get(meta: Dict[str, Any], key: str, default=None, required: bool = False):
    if key not in meta and required:
        raise UserError(f"GGUF metadata lacks {key}; the file is not a complete llama.cpp Llama model")
    return meta.get(key, default)


def llama3_rope_factors(head_dim: int, theta: float, scaling: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of llama3 RoPE scaling (what llama.cpp stores as rope_freqs.weight) [Dh/2]."""
    from dmc_jax.model.layers import rope_inv_freq

    return np.asarray(rope_inv_freq(head_dim, theta, None)) / np.asarray(rope_inv_freq(head_dim, theta, scaling))


def _rope_scaling(meta, rope_freqs, head_dim: int, theta: float, path: str):
    """RopeScaling for the GGUF: None, or llama3 parameters checked against its rope_freqs tensor."""
    kind = _get(meta, "llama.rope.scaling.type", "none")
    if kind not in ("none", "linear") or (kind == "linear" and _get(meta, "llama.rope.scaling.factor", 1.0) != 1.0):
        raise UserError(f"{path} uses rope scaling {kind!r}, which dmc_jax does not support (only llama3)")
    if rope_freqs is None:
        return None
    scaling = RopeScaling(factor=float(np.max(rope_freqs)),
                          original_max_position_embeddings=int(
                              _get(meta, "llama.rope.scaling.original_context_length", 8192)))
    if not np.allclose(llama3_rope_factors(head_dim, theta, scaling), rope_freqs, rtol=1e-4):
        raise UserError(f"{path} has rope_freqs that are not llama3 scaling with low/high freq factors 1/4; "
                        f"convert the model from its Hugging Face directory instead")
    return scaling


def _f32_decimal(x) -> float:
    """GGUF stores floats as float32: 1e-5 comes back 9.9999997e-06; return the shortest decimal (1e-05)."""
    return float(str(np.float32(x)))


def check_architecture(meta: Dict[str, Any], path: str) -> None:
    """UserError unless general.architecture is 'llama' (also Mistral-style and SmolLM2 files use it)."""
    arch = _get(meta, "general.architecture")
    if arch != "llama":
        raise UserError(f"{path} holds a {arch!r} model; dmc_jax loads Llama-family models only "
                        f"(general.architecture 'llama')")


def config_from_gguf(meta: Dict[str, Any], rope_freqs=None, path: str = "GGUF",
                     vocab_size: int | None = None) -> ModelConfig:
    """ModelConfig from llama.* GGUF metadata (vocab_size: token_embd rows); UserError unless architecture llama."""
    check_architecture(meta, path)
    embed = int(_get(meta, "llama.embedding_length", required=True))
    heads = int(_get(meta, "llama.attention.head_count", required=True))
    head_dim = int(_get(meta, "llama.attention.key_length", embed // heads))
    rope_dim = int(_get(meta, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UserError(f"{path} applies RoPE to {rope_dim} of {head_dim} head dims; dmc_jax needs full RoPE")
    theta = _f32_decimal(_get(meta, "llama.rope.freq_base", 10000.0))
    vocab_size = vocab_size or _get(meta, "llama.vocab_size") or len(_get(meta, "tokenizer.ggml.tokens", []))
    if not vocab_size:
        raise UserError(f"{path} has no token_embd.weight tensor; the file is not a complete Llama model")
    return ModelConfig(
        vocab_size=int(vocab_size), embed_dim=embed,
        num_layers=int(_get(meta, "llama.block_count", required=True)), num_heads=heads,
        num_kv_heads=int(_get(meta, "llama.attention.head_count_kv", heads)), head_dim=head_dim,
        mlp_dim=int(_get(meta, "llama.feed_forward_length", required=True)), rope_theta=theta,
        rope_scaling=_rope_scaling(meta, rope_freqs, head_dim, theta, path),
        norm_eps=_f32_decimal(_get(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        max_seq_len=int(_get(meta, "llama.context_length", 4096)),
        bos_id=_get(meta, "tokenizer.ggml.bos_token_id"), eos_id=_get(meta, "tokenizer.ggml.eos_token_id"))


def dequantize(tensor, path: str) -> np.ndarray:
    """One GGUF tensor -> float32 numpy array in numpy (reversed ne) order."""
    import gguf

    kind = tensor.tensor_type.name
    if kind not in SUPPORTED_TYPES:
        raise UserError(f"{path}: tensor {tensor.name} has type {kind}, which dmc_jax cannot dequantize "
                        f"(supported: {', '.join(SUPPORTED_TYPES)})")
    w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    shape = tuple(int(n) for n in reversed(tensor.shape))
    if w.shape != shape:
        raise UserError(f"{path}: tensor {tensor.name} decodes to shape {w.shape}, header says {shape}; "
                        f"the file is corrupt")
    return w


def load_gguf(path: str) -> Tuple[ModelConfig, Params, Dict[str, Any]]:
    """(config, float32 params in our layout, metadata dict incl. tokenizer arrays) of a Llama GGUF file."""
    return load_gguf_reader(open_gguf(path), path)


def load_gguf_reader(reader, path: str) -> Tuple[ModelConfig, Params, Dict[str, Any]]:
    """load_gguf for an already opened gguf.GGUFReader (opening parses all metadata: ~2 s for SmolLM2)."""
    meta = gguf_metadata(reader)
    check_architecture(meta, path)
    by_name = {t.name: t for t in reader.tensors}
    rope_freqs = dequantize(by_name["rope_freqs.weight"], path) if "rope_freqs.weight" in by_name else None
    embed = by_name.get("token_embd.weight")  # its rows: llama.vocab_size is optional in older files
    cfg = config_from_gguf(meta, rope_freqs, path, int(embed.shape[-1]) if embed is not None else None)
    cfg = cfg.replace(tie_embeddings="output.weight" not in by_name)
    expected = hf_names.hf_shapes(cfg)
    tensors = {}
    for name, tensor in by_name.items():
        if name == "rope_freqs.weight":
            continue
        hf = hf_name(name)
        if hf is None:
            raise UserError(f"{path} has tensor {name}, which a plain Llama model does not use; dmc_jax loads "
                            f"Llama-family models only")
        w = dequantize(tensor, path)
        if hf in expected and w.shape != expected[hf]:
            raise UserError(f"{path}: tensor {name} has shape {w.shape} but the metadata implies "
                            f"{expected[hf]}; the file is inconsistent")
        if name.endswith("attn_q.weight"):
            w = unpermute_rows(w, cfg.num_heads)
        elif name.endswith("attn_k.weight"):
            w = unpermute_rows(w, cfg.num_kv_heads)
        tensors[hf] = w
    return cfg, hf_names.from_hf(cfg, tensors, source=path), meta
