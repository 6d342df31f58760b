"""Megatron-LM GPT checkpoints (Megatron Core layout, tensor/pipeline parallel size 1) -> our config and parameters,
plus the DMC hyper-parameters of NVIDIA's DMC models (the `dmc` branch's `--dmc-*` arguments).

A checkpoint is `torch.save({'args': Namespace, 'iteration', 'checkpoint_version', 'model': state_dict, ...})` in
`mp_rank_00/model_optim_rng.pt`, read here with the torch-free, code-free reader (torch_zip). The state dict,
per layer i (Megatron Core GPTModel; names with the Transformer Engine spec, local-spec names in brackets):

    embedding.word_embeddings.weight                              [V, D]
    decoder.layers.i.self_attention.linear_qkv.layer_norm_weight  [D]      (input_layernorm.weight)
    decoder.layers.i.self_attention.linear_qkv.weight             [K * (G + 2) * Dh, D]
    decoder.layers.i.self_attention.linear_proj.weight            [D, H * Dh]
    decoder.layers.i.mlp.linear_fc1.layer_norm_weight             [D]      (pre_mlp_layernorm.weight)
    decoder.layers.i.mlp.linear_fc1.weight                        [2F, D]
    decoder.layers.i.mlp.linear_fc2.weight                        [D, F]
    decoder.final_layernorm.weight                                [D]
    output_layer.weight                                           [V, D]   (absent when embeddings are tied)
    *._extra_state                                                Transformer Engine state, ignored

Fused QKV rows are grouped per KV head (megatron/core/transformer/attention.py, get_query_key_value_tensors):
for each of the K groups, G = H / K query heads of Dh rows, then its key head, then its value head. fc1 stacks
the SwiGLU gate (first F rows, the SiLU input) over the up projection (megatron/core/transformer/mlp.py). RoPE is
Megatron's non-interleaved (rotate-half) form, the Hugging Face layout, so no row permutation is needed.
Letters: L layers, D embed, H query heads, K KV heads, G = H / K, Dh head dim, F mlp, V (padded) vocab.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, Optional, Tuple

import ml_collections
import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig
from dmc_jax.weights import hf_names

CKPT_FILE = "model_optim_rng.pt"
TRACKER = "latest_checkpointed_iteration.txt"
# the reference trains in bf16 and its inference kernel adds torch.finfo(torch.bfloat16).eps to the importance
BF16_EPS = 2.0 ** -7

_LAYER_RE = re.compile(r"decoder\.layers\.(\d+)\.(.+)")
# Megatron per-layer name -> HF per-layer name (fused tensors are split separately)
_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_GLOBAL = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}


def find_checkpoint(path: str) -> str:
    """The model_optim_rng.pt of a Megatron checkpoint: the file itself, <path>/mp_rank_00/, or the iteration
    that <path>/latest_checkpointed_iteration.txt names (iter_%07d/ or release/)."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise UserError(f"Megatron checkpoint {path} does not exist; give its directory or {CKPT_FILE}")
    dirs = [path]
    tracker = os.path.join(path, TRACKER)
    if os.path.isfile(tracker):
        it = open(tracker).read().strip()
        if it == "release" or it.isdigit():
            dirs.insert(0, os.path.join(path, "release" if it == "release" else f"iter_{int(it):07d}"))
    for d in dirs:
        if os.path.isdir(os.path.join(d, "mp_rank_01")) or os.path.isdir(os.path.join(d, "mp_rank_00_000")):
            raise UserError(f"{d} holds a tensor- or pipeline-parallel checkpoint; merge it to one shard first "
                            f"(Megatron's tools/checkpoint/convert.py --target-tensor-parallel-size 1 "
                            f"--target-pipeline-parallel-size 1)")
        candidate = os.path.join(d, "mp_rank_00", CKPT_FILE)
        if os.path.isfile(candidate):
            return candidate
    raise UserError(f"{path} has no mp_rank_00/{CKPT_FILE} (nor one under the iteration named by {TRACKER}); "
                    f"it is not a Megatron checkpoint")


def _arg(args, name: str, default: Any = None, required: bool = False):
    if not hasattr(args, name):
        if required:
            raise UserError(f"the checkpoint's saved arguments lack {name}; it is not a Megatron GPT checkpoint")
        return default
    value = getattr(args, name)
    return default if value is None else value


def config_from_args(args, vocab_rows: int, dtype: str) -> ModelConfig:
    """ModelConfig from Megatron's saved arguments; UserError for anything our Llama model cannot express."""
    if args is None or not hasattr(args, "__dict__"):
        raise UserError("the checkpoint has no saved arguments ('args'); dmc_jax needs them to know the model")
    checks = [
        (_arg(args, "normalization", "LayerNorm") == "RMSNorm", "normalization must be RMSNorm"),
        (bool(_arg(args, "swiglu", False)), "the MLP must be SwiGLU (--swiglu)"),
        (not _arg(args, "add_bias_linear", True), "linear layers must have no bias (--disable-bias-linear)"),
        (not _arg(args, "add_qkv_bias", False), "q/k/v must have no bias"),
        (_arg(args, "position_embedding_type", "rope") == "rope" or _arg(args, "use_rotary_position_embeddings"),
         "positions must be rotary (--position-embedding-type rope)"),
        (float(_arg(args, "rotary_percent", 1.0)) == 1.0, "RoPE must rotate the whole head (--rotary-percent 1.0)"),
        (not _arg(args, "rotary_interleaved", False), "RoPE must be non-interleaved"),
        (not _arg(args, "apply_layernorm_1p", False), "norms must not be 1 + weight (--apply-layernorm-1p)"),
        (_arg(args, "rotary_seq_len_interpolation_factor", None) in (None, 1), "RoPE must not be interpolated"),
        (not _arg(args, "use_rope_scaling", False), "llama3 RoPE scaling is not read from Megatron checkpoints"),
        (int(_arg(args, "tensor_model_parallel_size", 1)) == 1 and int(_arg(args, "pipeline_model_parallel_size", 1))
         == 1, "the checkpoint must be merged to tensor/pipeline parallel size 1"),
    ]
    for ok, what in checks:
        if not ok:
            raise UserError(f"this Megatron checkpoint cannot be converted to a Llama model: {what}")
    heads = int(_arg(args, "num_attention_heads", required=True))
    hidden = int(_arg(args, "hidden_size", required=True))
    kv_heads = int(_arg(args, "num_query_groups", heads)) if _arg(args, "group_query_attention", False) else heads
    padded = _arg(args, "padded_vocab_size", vocab_rows)
    if int(padded) != vocab_rows:
        raise UserError(f"the saved args say padded_vocab_size={padded} but the embedding has {vocab_rows} rows")
    return ModelConfig(
        vocab_size=vocab_rows, embed_dim=hidden, num_layers=int(_arg(args, "num_layers", required=True)),
        num_heads=heads, num_kv_heads=kv_heads, head_dim=int(_arg(args, "kv_channels", hidden // heads)),
        mlp_dim=int(_arg(args, "ffn_hidden_size", required=True)),
        rope_theta=float(_arg(args, "rotary_base", 10000)),
        norm_eps=float(_arg(args, "norm_epsilon", _arg(args, "layernorm_epsilon", 1e-5))),
        tie_embeddings=not _arg(args, "untie_embeddings_and_output_weights", False),
        max_seq_len=int(_arg(args, "max_position_embeddings", _arg(args, "seq_length", 4096))),
        param_dtype=dtype)


def _split_layer(cfg: ModelConfig, i: int, name: str, w: np.ndarray, out: Dict[str, np.ndarray], src: str):
    """One Megatron per-layer tensor -> its HF tensor(s) in `out`."""
    hf = lambda n: hf_names.layer_name(i, n)  # noqa: E731
    K, G, Dh, D, F = cfg.num_kv_heads, cfg.group_size, cfg.head_dim, cfg.embed_dim, cfg.mlp_dim
    if name == "self_attention.linear_qkv.weight":
        if w.shape != (K * (G + 2) * Dh, D):
            raise UserError(f"{src}: layer {i} linear_qkv has shape {w.shape}, the args imply {(K * (G + 2) * Dh, D)}")
        w_KGDhD = w.reshape(K, G + 2, Dh, D)  # per group: G query heads, its key head, its value head
        out[hf("self_attn.q_proj.weight")] = w_KGDhD[:, :G].reshape(K * G * Dh, D)
        out[hf("self_attn.k_proj.weight")] = w_KGDhD[:, G].reshape(K * Dh, D)
        out[hf("self_attn.v_proj.weight")] = w_KGDhD[:, G + 1].reshape(K * Dh, D)
    elif name == "mlp.linear_fc1.weight":
        if w.shape != (2 * F, D):
            raise UserError(f"{src}: layer {i} linear_fc1 has shape {w.shape}, SwiGLU with the args needs {(2 * F, D)}")
        out[hf("mlp.gate_proj.weight")], out[hf("mlp.up_proj.weight")] = w[:F], w[F:]
    elif name in _LAYER:
        out[hf(_LAYER[name])] = w
    elif not name.endswith("_extra_state"):
        raise UserError(f"{src} has tensor decoder.layers.{i}.{name}, which a Llama layer does not use; "
                        f"dmc_jax converts Megatron Core GPT (Llama-style) checkpoints only")


def hf_tensors(cfg: ModelConfig, state: Dict[str, Any], src: str) -> Dict[str, np.ndarray]:
    """Megatron state dict -> {HF Llama name: array} (views where possible; hf_names.from_hf checks shapes)."""
    out: Dict[str, np.ndarray] = {}
    for name, w in state.items():
        m = _LAYER_RE.fullmatch(name)
        if m:
            _split_layer(cfg, int(m.group(1)), m.group(2), w, out, src)
        elif name in _GLOBAL:
            out[_GLOBAL[name]] = w
        elif not name.endswith("_extra_state"):
            hint = " (the legacy language_model.* layout: convert it to Megatron Core first)" if \
                name.startswith("language_model") else ""
            raise UserError(f"{src} has tensor {name}, which a Megatron Core GPT model does not use{hint}")
    return out


def dmc_section(args, target_cr: float = 0.0) -> Optional[ml_collections.ConfigDict]:
    """The `dmc` section for a checkpoint trained by Megatron's dmc branch (its --dmc-* args), else None.

    From megatron/contrib/dmc: the decision logit is the last key channel minus --dmc-init-val, the importance the
    last query channel (mean over the group) plus the same offset, both channels zeroed before and after RoPE,
    --dmc-window-size the accumulation window (0 = none), --dmc-cr the CR trained for.
    """
    if not hasattr(args, "dmc_init_val"):
        return None
    from dmc_jax.dmc.objective import default_config

    section = default_config()
    window = int(_arg(args, "dmc_window_size", 12))
    section.update(dict(decision_channel=-1, decision_offset=float(_arg(args, "dmc_init_val", 5.0)),
                        temperature=float(_arg(args, "dmc_temp", 0.1)), importance_eps=BF16_EPS,
                        window=max(window, 0), zero_after_rope=True,
                        target_cr=float(target_cr or _arg(args, "dmc_cr", 4.0))))
    return section


def load_megatron(path: str) -> Tuple[ModelConfig, Dict[str, np.ndarray], Any]:
    """(config, {HF name: memory-mapped array}, saved args) of a Megatron checkpoint directory or file."""
    from dmc_jax.weights import torch_zip

    ckpt = find_checkpoint(path)
    obj = torch_zip.load(ckpt)
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        raise UserError(f"{ckpt} has no 'model' state dict; it is not a Megatron checkpoint "
                        f"(its top level: {sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__})")
    state = obj["model"]
    embed = state.get("embedding.word_embeddings.weight")
    if embed is None:
        raise UserError(f"{ckpt} lacks embedding.word_embeddings.weight; only Megatron Core GPT checkpoints "
                        f"are supported")
    dtype = {"bfloat16": "bfloat16", "float16": "float16"}.get(str(embed.dtype), "float32")
    cfg = config_from_args(obj.get("args"), int(embed.shape[0]), dtype)
    return cfg, hf_tensors(cfg, state, ckpt), obj.get("args")


def load_params(path: str):
    """(config, params in our layout, saved args): hf_names.from_hf copies the mapped tensors once."""
    cfg, tensors, args = load_megatron(path)
    return cfg, hf_names.from_hf(cfg, tensors, source=find_checkpoint(path)), args
