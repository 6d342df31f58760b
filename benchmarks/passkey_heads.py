"""Which KV heads of a DMS model's paged cache still hold a passkey after the prompt: per depth, how many of the
L x K heads keep every digit of the key (and any of them), per layer, and how many tokens the full pool forced out.

    .venv/bin/python benchmarks/passkey_heads.py --model runs/dms_cr8_2k_w64/model390 --threshold -0.051 \\
        --window 64 --target-cr 10.5 [--length 2048] [--trials 4] [--depths 0.1,0.5,0.9] [--json out.json]

Each prompt is task compare's passkey prompt (dmc_jax/evaluation/passkey.py: intro, filler from the default corpus's
held-out works with the needle at `depth`, the question), prefilled through the dms_paged cache as task compare
serves it (pages of 8, margin 1, on_overflow 'evict', bf16); the cache's pool positions per head after the prefill
say which tokens it holds. Answers nothing about generation: what a head holds, not whether the model uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a DMS model directory (with kv_method.json)")
    ap.add_argument("--threshold", type=float, default=0.0, help="serving threshold (cache.dms_paged.threshold)")
    ap.add_argument("--window", type=int, default=0, help="serving window (0 = the model's)")
    ap.add_argument("--target-cr", type=float, default=10.5, help="pool size as cache.dms_paged.target_cr")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--trials", type=int, default=4, help="prompts per depth")
    ap.add_argument("--depths", default="0.1,0.5,0.9")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.chdir(ROOT)

    from dmc_jax.config_loader import parse_argv
    from dmc_jax.errors import UserError

    argv = ["--config", "configs/smollm2.py", f"--config.model.source={a.model}", "--config.model.param_dtype=bfloat16",
            "--config.model.compute_dtype=bfloat16", "--config.cache.method=dms_paged",
            f"--config.cache.dms_paged.threshold={a.threshold}", f"--config.cache.dms_paged.target_cr={a.target_cr}",
            "--config.cache.dms_paged.page_size=8", "--config.cache.dms_paged.margin=1.0",
            "--config.cache.dms_paged.on_overflow=evict"]
    if a.window:
        argv.append(f"--config.cache.dms_paged.window={a.window}")
    try:
        rows = run(parse_argv(argv), a)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"args": vars(a), "prompts": rows}, indent=1))


def run(config, a) -> list:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dmc_jax.cache import model_method
    from dmc_jax.evaluation import compare_grid, passkey
    from dmc_jax.evaluation.text_files import read_text
    from dmc_jax.model import llama
    from dmc_jax.tasks.common import load_model
    from dmc_jax.tasks.evaluate import default_text_files

    m = load_model(config)
    resolved = model_method.resolve(config, "dms_paged")
    method = compare_grid.method_factory(config.cache, "dms_paged", 8.0, resolved.hparams)(a.length + 8)
    params = llama.compute_dtype_weights(llama.layers_for(m.params, method, otherwise=llama.unstack_layers), m.cfg)
    tok = m.tokenizer
    filler = np.asarray(sum((tok.encode(read_text(f)) for f in default_text_files()), []), np.int32)

    @jax.jit
    def prefilled(params, prompt_BT, lengths_B):
        state = method.init(m.cfg, prompt_BT.shape[0], prompt_BT.shape[1] + 8)
        return llama.prefill(params, prompt_BT, lengths_B, state, method, m.cfg)[1]

    rng = np.random.default_rng(a.seed)
    out = []
    for depth in (float(d) for d in a.depths.split(",")):
        for _ in range(a.trials):
            key = int(rng.integers(10000, 100000))
            offset = int(rng.integers(0, max(len(filler) - a.length, 1)))
            ids = passkey.build_prompt(tok, filler, a.length, depth, key, offset)
            needle = tok.encode(passkey.NEEDLE.format(key=key))
            start = next(i for i in range(len(ids)) if ids[i:i + len(needle)] == needle)
            digits = [start + j for j, t in enumerate(needle) if any(c.isdigit() for c in tok.decode([t]))]
            st = prefilled(params, jnp.asarray([ids], jnp.int32), jnp.asarray([len(ids)], jnp.int32))
            table, count, pos = (np.asarray(st[k]) for k in ("table", "count", "pool_pos"))
            L, _, K, _ = table.shape
            N = pos.shape[1]
            all_LK, any_LK = np.zeros((L, K), bool), np.zeros((L, K), bool)
            for layer in range(L):
                for head in range(K):
                    slots = np.arange(count[layer, 0, head])
                    held = set(pos[table[layer, 0, head, slots // N], slots % N].tolist())
                    all_LK[layer, head] = all(d in held for d in digits)
                    any_LK[layer, head] = any(d in held for d in digits)
            row = {"depth": depth, "key": key, "heads": L * K, "heads_all_digits": int(all_LK.sum()),
                   "heads_any_digit": int(any_LK.sum()), "per_layer_all": all_LK.sum(1).tolist(),
                   "forced_out": int(np.asarray(st["overflow"]).sum()), "needle_from_end": len(ids) - start}
            out.append(row)
            print(f"depth {depth} key {key}: {row['heads_all_digits']} of {L * K} heads hold every digit "
                  f"({row['heads_any_digit']} some), per layer {''.join(str(x) for x in row['per_layer_all'])}; "
                  f"{row['forced_out']} tokens forced out; needle {row['needle_from_end']} tokens from the end",
                  flush=True)
    return out


if __name__ == "__main__":
    main()
