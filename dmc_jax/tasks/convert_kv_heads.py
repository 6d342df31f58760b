"""Task `convert_kv_heads`: convert config.model to fewer KV heads (config.kv_heads) and write a HF directory.

    python -m dmc_jax.main --config configs/smollm2.py --config.task=convert_kv_heads \
        --config.kv_heads.method=svd_a --config.kv_heads.rope=B --config.kv_heads.new_kv_heads=1

The result (strategy B, mean or svd_w) is an ordinary GQA Llama directory: every task loads it with
model.source=<dir> (eval, generate, compare with any cache method) and up-training reuses the training loop:

    python -m dmc_jax.main --config configs/smollm2_train.py --config.model.source=<run dir>/model

Strategy A (kv_heads.rope='A') projects rotated q/k at run time, an architecture a HF directory cannot express:
it is evaluated in place by task compare and refused here.
"""

from __future__ import annotations

import os
import time

from dmc_jax.errors import UserError
from dmc_jax.kv_heads import convert as kvc
from dmc_jax.kv_heads.options import validate


def run(config, model) -> dict:
    c = config.kv_heads
    validate(c)
    if c.rope == "A" and c.method == "svd_a":
        raise UserError("kv_heads.rope='A' keeps W_k and projects rotated keys at run time, which a Hugging Face "
                        "directory cannot express; convert with kv_heads.rope='B' (or evaluate A with task compare)")
    start = time.perf_counter()
    conv = kvc.convert_from_config(c, model.cfg, model.params, model.tokenizer)
    seconds = time.perf_counter() - start
    out = c.output or os.path.join(config.output_dir, "model")
    from dmc_jax.weights.hf_io import save_hf_dir, tokenizer_files_of

    save_hf_dir(out, conv.cfg, conv.params, tokenizer_files=tokenizer_files_of(model.tokenizer), overwrite=True)
    print(f"{conv.description}: {model.cfg.num_kv_heads} -> {conv.cfg.num_kv_heads} KV heads "
          f"(cache {model.cfg.num_kv_heads * model.cfg.head_dim / (conv.cfg.num_kv_heads * conv.cfg.head_dim):.1f}x "
          f"smaller) written to {out} ({seconds:.0f} s)")
    return {"output": out, "description": conv.description, "num_kv_heads": conv.cfg.num_kv_heads,
            "head_dim": conv.cfg.head_dim, "seconds": seconds}
