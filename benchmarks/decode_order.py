"""Decoded perplexity token by token against layer by layer, side by side: the same model, rows and cache methods,
each order's seconds (compile excluded) and perplexity, which must agree.

    .venv/bin/python benchmarks/decode_order.py [--model smollm2] [--methods dense,h2o,tova] [--ratio 8] \\
        [--tokens 512] [--sequences 4] [--dtype bfloat16] [--json runs/decode_order.json]

Token by token (`decode_step` in a scan over tokens, the layers scanned inside it) is how a server decodes and how
evaluations ran until the sixteenth session; layer by layer (`llama.decode_forced`) runs every token through layer
0, then layer 1, ... (the layer's matmuls see all tokens at once; only its cache runs token by token). The rows are
held-out text of the default corpus (a model with a tokenizer) or random tokens. Each timing is the best of
--repeats calls after a compiling one; run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--methods", default="dense,h2o,tova")
    ap.add_argument("--ratio", type=float, default=8.0, help="eviction budget = tokens / ratio")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default="runs/decode_order.json")
    a = ap.parse_args(argv)
    if not 0 < a.prefix < a.tokens - 1:
        print(f"error: --prefix must be in [1, --tokens - 2]; got {a.prefix}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from dmc_jax.cache import registry
    from dmc_jax.data import default_corpus
    from dmc_jax.errors import UserError
    from dmc_jax.evaluation import decode_perplexity as dp
    from dmc_jax.evaluation.text_files import token_rows
    from dmc_jax.model import llama
    from dmc_jax.weights.load import load_model

    try:
        model = load_model(a.model, require_tokenizer=False)
        cfg = model.cfg.replace(compute_dtype=a.dtype)
        params = llama.compute_dtype_weights(model.params, cfg)
        if model.tokenizer is not None:
            rows = token_rows(model.tokenizer, default_corpus.heldout_files(), a.tokens, a.sequences)
        else:
            rows = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (a.sequences, a.tokens), 0, cfg.vocab_size))
        budget = max(int(np.ceil(a.tokens / a.ratio)), 8)
        methods = []
        for name in [m.strip() for m in a.methods.split(",") if m.strip()]:
            cache = ml_collections.ConfigDict({"method": name, "budget": budget})
            methods.append(registry.build(name, cache, None))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def timed(method, order: str):
        fn = jax.jit(lambda p, x: dp.nll_through_cache(p, x, method, cfg, a.prefix, order)[0])
        x = jnp.asarray(rows)
        t = time.perf_counter()
        nll = fn(params, x).block_until_ready()
        compile_s = time.perf_counter() - t
        best = float("inf")
        for _ in range(a.repeats):
            t = time.perf_counter()
            fn(params, x).block_until_ready()
            best = min(best, time.perf_counter() - t)
        return float(np.exp(np.mean(np.asarray(nll, np.float64)))), best, compile_s - best

    results = []
    print(f"{a.model}: {a.sequences} x {a.tokens} tokens, prefix {a.prefix}, {a.dtype}, budget {budget}, "
          f"{jax.devices()[0].device_kind}")
    for method in methods:
        if not llama.layers_independent(method):
            print(f"  {method.name}: its layers share a page pool; decoded token by token only")
            continue
        ppl_t, s_t, c_t = timed(method, "token")
        ppl_l, s_l, c_l = timed(method, "layer")
        results.append({"method": method.name, "token_by_token_s": s_t, "layer_by_layer_s": s_l,
                        "speedup": s_t / s_l, "compile_token_s": c_t, "compile_layer_s": c_l,
                        "perplexity_token": ppl_t, "perplexity_layer": ppl_l})
        print(f"  {method.name:<14} token by token {s_t:6.2f} s (ppl {ppl_t:.4f})   layer by layer {s_l:6.2f} s "
              f"(ppl {ppl_l:.4f})   {s_t / s_l:4.1f}x   (compile {c_t:.0f} s / {c_l:.0f} s)", flush=True)
    out = {"model": a.model, "tokens": a.tokens, "sequences": a.sequences, "prefix": a.prefix, "dtype": a.dtype,
           "budget": budget, "device": jax.devices()[0].device_kind, "rows": results}
    path = pathlib.Path(a.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"json: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
