"""The compression ratio a trained DMS model's cache reaches on held-out text at each serving threshold: how to pick
`cache.dms.threshold` / `cache.dms_paged.threshold` for a target CR (and so the pool's bytes) before serving.

    .venv/bin/python benchmarks/dms_thresholds.py --model runs/dms_cr8/model200 [--tokens 512] [--sequences 4]
        [--thresholds=0,0.5,1,2,3,4] [--window W] [--ppl] [--text-files a.txt,b.txt] [--json runs/dms_thresholds.json]
    .venv/bin/python benchmarks/dms_thresholds.py --model runs/main_job4/dms/model --calibrate 62 [--sequences 8]

A positive threshold marks fewer tokens (a token is marked when its decision logit exceeds the threshold), so the
cache keeps more and the CR falls. Each row prefills `sequences` held-out rows of `tokens` tokens (default: the
default corpus's held-out works, never trained on) through the DMS cache with an unbounded buffer, i.e. DMS's hard
parallel form, and reports what the cache holds after the last token: tokens seen / entries kept over every layer,
sequence and KV head, and the spread over heads. A token-by-token decode keeps exactly what this prefill keeps
(tests/test_dms.py checks the equivalence), so on the same text the CR is the one task compare measures at the end
of a decoded sequence of the same length (compare spreads its rows over the text, this takes the first windows:
for the README's CR-8 DMS model 8.70 against compare's 8.74). Size a paged pool from it: slots per head ~
tokens / CR plus half a page.

--calibrate SLOTS chooses the threshold instead of sweeping: the one whose kept tokens per head fill SLOTS (a pool's
slots per head less half a page), on TRAINING text by default (the default corpus's training works; never the
held-out text you will measure on), with dmc_jax/dms/calibrate.py, as task retrofit's retrofit.calibrate_threshold
does after training; it prints the threshold to serve with (cache.dms_paged.threshold) and writes it to the JSON.
The model runs in its stored dtype (fp32 for our exports), the retrofit in its compute dtype, so the two differ in
the last digits (the main job's model: +0.556 here, +0.542 in its bf16 retrofit).

--ppl adds, per threshold, the perplexity of the same rows in DMS's hard parallel form with that threshold and
window (the no-cache oracle: exactly the tokens an unbounded DMS cache keeps, tests/test_dms.py), one forward pass
per row instead of a token-by-token decode: a quick way to choose a threshold and serving window before task
compare measures the chosen ones through the bounded pool (whose overflow evictions this does not model).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def hard_form_perplexity(model, rows_NT, dms, threshold: float) -> float:
    """Perplexity of the rows (each its own window) in DMS's hard parallel form; a serving threshold t marks a
    token when its decision logit exceeds t, i.e. the decision offset grows by t."""
    from dmc_jax.dms.attention import DMSAttention
    from dmc_jax.evaluation.perplexity import perplexity

    attention = DMSAttention(dms.replace(mode="hard", decision_offset=dms.decision_offset + threshold))
    n, T = rows_NT.shape
    return perplexity(model.params, rows_NT.reshape(-1).tolist(), model.cfg, window=T, stride=T,
                      attention=attention).perplexity


def _training_files() -> list:
    from dmc_jax.data import default_corpus

    default_corpus.ensure_default_corpus(default_corpus.DEFAULT_CACHE_DIR)
    return sorted(str(p) for p in default_corpus.train_dir(default_corpus.DEFAULT_CACHE_DIR).glob("*.txt"))


def _calibrate(args, model, saved, files) -> int:
    """--calibrate: the threshold that fills args.calibrate slots per head on `files`, printed and written."""
    import ml_collections

    from dmc_jax.dms import calibrate
    from dmc_jax.dms.config import from_section
    from dmc_jax.evaluation.text_files import token_rows

    rows_NT = token_rows(model.tokenizer, files, args.tokens, args.sequences)
    dms = from_section(ml_collections.ConfigDict(saved.hparams))
    if args.window:
        dms = dms.replace(window=args.window)
    found = calibrate.calibrate(model.params, model.cfg, dms, rows_NT, args.calibrate)
    print(f"threshold {found.threshold:+.3f}: {found.kept_per_head:.1f} of {found.tokens} tokens kept per head "
          f"(target {args.calibrate:.1f}) on {found.rows} rows of {', '.join(os.path.basename(f) for f in files[:3])}"
          f"{' ...' if len(files) > 3 else ''}; serve with --config.cache.dms_paged.threshold={found.threshold}")
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": args.model, "window": dms.window, "text_files": files,
                                "calibration": found.to_dict()}, indent=1))
    print(f"json: {os.path.relpath(path)}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a trained DMS model directory (with kv_method.json)")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--thresholds", default="0,0.5,1,2,3,4")
    ap.add_argument("--window", type=int, default=0, help="serving window (cache.dms.window); 0 = the trained one")
    ap.add_argument("--text-files", default="", help="comma-separated; '' = the default corpus's held-out works")
    ap.add_argument("--ppl", action="store_true", help="also the perplexity of the hard parallel form")
    ap.add_argument("--calibrate", type=float, default=0.0,
                    help="choose the threshold that keeps this many tokens per head on training text (no sweep)")
    ap.add_argument("--json", default=str(ROOT / "runs" / "dms_thresholds.json"))
    args = ap.parse_args(argv)
    try:
        thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    except ValueError:
        print(f"error: --thresholds must be comma-separated numbers; got {args.thresholds!r}", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp
    import ml_collections

    from dmc_jax.cache import model_method, registry
    from dmc_jax.data import default_corpus
    from dmc_jax.errors import UserError
    from dmc_jax.evaluation.text_files import token_rows
    from dmc_jax.model import llama
    from dmc_jax.weights.load import load_model

    try:
        saved = model_method.read(args.model)
        if saved is None or registry.get(saved.method).trained is None or \
                registry.get(saved.method).trained.section != "dms":
            raise UserError(f"{args.model} is not a trained DMS model directory (its kv_method.json names no DMS "
                            f"method); give the export_dir of a DMS training run")
        model = load_model(args.model)
        files = [f for f in args.text_files.split(",") if f.strip()]
        if args.calibrate:
            return _calibrate(args, model, saved, files or _training_files())
        files = files or default_corpus.heldout_files()
        rows_NT = token_rows(model.tokenizer, files, args.tokens, args.sequences)
        config = ml_collections.ConfigDict({"model": {"source": args.model}, "cache": registry.default_config()})
        config.cache.method = "dms"
        resolved = model_method.resolve(config)
        n, T = rows_NT.shape
        lengths_B = jnp.full((n,), T, jnp.int32)
        results = []
        for t in thresholds:
            method = resolved.make(capacity=T, threshold=t, target_cr=0.0,  # unbounded: nothing forced out
                                   window=args.window)
            state = method.init(model.cfg, n, T)
            start = time.perf_counter()
            _, state = jax.jit(lambda p, x, l, s: llama.prefill(p, x, l, s, method, model.cfg))(
                model.params, jnp.asarray(rows_NT), lengths_B, state)
            stats = method.stats(state, lengths_B)
            cr_LBK = stats["compression_ratio_LBK"]
            row = {"threshold": t, "compression_ratio": float(stats["compression_ratio"]),
                   "kept_per_head": float(jnp.mean(stats["kept_LBK"])), "head_cr_min": float(jnp.min(cr_LBK)),
                   "head_cr_max": float(jnp.max(cr_LBK)), "seconds": round(time.perf_counter() - start, 1)}
            if args.ppl:
                row["perplexity"] = hard_form_perplexity(model, rows_NT, method.dms, t)
            results.append(row)
            print(f"threshold {t:+.2f}: CR {row['compression_ratio']:.2f} ({row['kept_per_head']:.1f} of {T} "
                  f"tokens kept per head; heads {row['head_cr_min']:.2f}-{row['head_cr_max']:.2f})"
                  + (f", perplexity {row['perplexity']:.3f}" if args.ppl else ""), flush=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = {"model": args.model, "tokens": T, "sequences": n, "window": method.dms.window, "text_files": files,
           "rows": results}
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"json: {os.path.relpath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
