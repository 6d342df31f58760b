"""Task `convert_megatron`: a Megatron-LM checkpoint (e.g. NVIDIA's Llama-2-7B-DMC-8x) -> a Hugging Face directory.

    python -m dmc_jax.main --config configs/megatron_dmc.py --config.convert.source=<Megatron dir> \
        --config.convert.tokenizer=<Llama-2 HF dir> --config.convert.output=<out dir>

The output is an ordinary model directory (config.json, safetensors, the tokenizer files) that every task accepts
as model.source; a checkpoint from Megatron's DMC branch also gets its DMC hyper-parameters (kv_method.json), so
`--config.cache.method=dmc_paged` serves it with the window, offset and CR it was trained with.
"""

from __future__ import annotations

import os
import resource
import time

import jax
import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.weights.convert_options import validate


class _TokenizerFiles:
    """The tokenizer files of a directory (or one tokenizer.model), for the writers' `to_files` protocol."""

    NAMES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")

    def __init__(self, path: str):
        self.paths = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in self.NAMES
                                                          if os.path.isfile(os.path.join(path, n))]

    def to_files(self) -> dict:
        return {os.path.basename(p): open(p, "rb").read() for p in self.paths}


def _tokenizer(path: str):
    """(tokenizer, its files) from a HF directory or a tokenizer.model file."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        from dmc_jax.tokenizer.sp_tokenizer import load_sp_tokenizer

        return load_sp_tokenizer(path), _TokenizerFiles(path)
    if not os.path.isdir(path):
        raise UserError(f"convert.tokenizer {path} does not exist; give the model's Hugging Face directory or its "
                        f"tokenizer.model")
    from dmc_jax.weights.load import load_tokenizer

    return load_tokenizer(path), _TokenizerFiles(path)


def _trim(cfg, params, vocab: int):
    """Drops the vocabulary padding rows Megatron adds (to a multiple of 128 x tensor-parallel size)."""
    params = dict(params, embed={"embedding": params["embed"]["embedding"][:vocab]})
    if "lm_head" in params:
        params["lm_head"] = params["lm_head"][:, :vocab]
    return cfg.replace(vocab_size=vocab), params


def run(config) -> dict:
    from dmc_jax.weights import megatron

    c = config.convert
    validate(c)
    start = time.perf_counter()
    cfg, params, args = megatron.load_params(c.source)
    section = megatron.dmc_section(args, c.target_cr)
    tokenizer, files = (None, None)
    if c.tokenizer:
        tokenizer, files = _tokenizer(c.tokenizer)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"the tokenizer at {c.tokenizer} has {tokenizer.vocab_size} tokens but the checkpoint's "
                            f"embedding only {cfg.vocab_size} rows; give the tokenizer the model was trained with")
        cfg = cfg.replace(bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
        if c.trim_vocab and tokenizer.vocab_size < cfg.vocab_size:
            cfg, params = _trim(cfg, params, tokenizer.vocab_size)
    if c.dtype and c.dtype != cfg.param_dtype:
        from dmc_jax.model.config import DTYPES

        params = jax.tree.map(lambda w: np.asarray(w).astype(DTYPES[c.dtype]), params)
        cfg = cfg.replace(param_dtype=c.dtype)
    out = c.output or os.path.join(config.output_dir, "model")
    if section is not None:
        from dmc_jax.cache import model_method, registry

        model_method.save(out, cfg, params, files, registry.get("dmc").trained.serve_method, section)
    else:
        from dmc_jax.weights.hf_io import save_hf_dir, tokenizer_files_of

        save_hf_dir(out, cfg, params, tokenizer_files=tokenizer_files_of(files), overwrite=True)
    seconds = time.perf_counter() - start
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    method = f"DMC (target CR {section.target_cr:g}, window {section.window})" if section is not None else "none"
    print(f"converted {megatron.find_checkpoint(c.source)} ({cfg.num_params() / 1e9:.2f}B parameters, "
          f"{cfg.param_dtype}, cache method {method}) to {out} in {seconds:.0f} s, peak memory {peak_gib:.1f} GiB")
    return {"output": out, "source": megatron.find_checkpoint(c.source), "num_params": cfg.num_params(),
            "param_dtype": cfg.param_dtype, "vocab_size": cfg.vocab_size, "dmc": section.to_dict() if section else None,
            "iteration": getattr(args, "iteration", None), "seconds": seconds, "peak_rss_gib": peak_gib}
