"""The retrofit's side-by-side: the trained model through its own serving cache next to training-free eviction
(`retrofit.side_by_side`, default H2O and TOVA) AT THE CR THE TRAINED MODEL REACHED, on the same held-out text.

Every row is measured with task compare's decode-time protocol (held-out sequences of eval.window tokens, a short
prefix prefilled, the rest decoded through the cache; optionally passkey retrieval), in ONE compare
run directory, <run>/side_by_side (compare.md, rows.json, plots):
    1. the dense cache (the original model, CR 1) and the trained model with its serving cache (e.g. dmc_paged):
       its logical CR on this text is measured, not assumed;
    2. each eviction method with the budget that gives that CR (ceil(window / CR) slots per layer, sequence and
       KV head), so it holds no more tokens than the trained model;
    3. when the trained model's bytes say another CR (dense bytes / its bytes, e.g. a pool with a page table, or
       sized above what the model keeps) that differs by more than 1%, each eviction method again at that CR: the
       comparison at the same cache MEMORY, whichever side it favours.
The compare run resumes like task compare: running the retrofit again reuses the rows already measured.
"""

from __future__ import annotations

import copy
import os

import ml_collections

from dmc_jax.cache import registry
from dmc_jax.evaluation import compare_options
from dmc_jax.evaluation.side_by_side_options import DEFAULT_METHODS
from dmc_jax.kv_heads import options as kv_heads_options


def compare_config(config: ml_collections.ConfigDict, out_dir: str, methods, ratios,
                   extra_models) -> ml_collections.ConfigDict:
    """The retrofit config as a task-compare config over the retrofit's held-out text and window."""
    r, e = config.retrofit, config.eval
    c = copy.deepcopy(config)
    with c.unlocked():
        c.task = "compare"
        c.output_dir = out_dir
        if "cache" not in c:
            c.cache = registry.default_config()
        if "kv_heads" not in c:
            c.kv_heads = kv_heads_options.default_config()
        c.compare = compare_options.default_config()
        c.compare.update(methods=("dense", *methods), ratios=tuple(float(x) for x in ratios), kv_heads=(),
                         extra_models=tuple(extra_models), evals=tuple(r.get("side_by_side_evals", ("ppl",))),
                         text_files=e.text_files, context=int(e.window), prefix=min(32, int(e.window) // 4),
                         ppl_sequences=int(r.get("side_by_side_sequences", 4)), passkey_lengths=(int(e.window),),
                         passkey_trials=4)
    return c


def serving_method(config: ml_collections.ConfigDict) -> str:
    """The trained model's cache in the rows: cache.method when it is one of the method's serving caches, else the
    serving engine's (DMS: the paged pool dms_paged), else the model's own serving cache (DMC: dmc_paged)."""
    trained = registry.get(config.retrofit.get("method", "dmc")).trained
    chosen = (config.get("cache") or ml_collections.ConfigDict()).get("method", "auto")
    if chosen and chosen in (trained.serve_method, trained.engine_method):
        return chosen
    return trained.engine_method or trained.serve_method


def _previous_trained(config, label: str, model_dir: str) -> dict | None:
    """The trained model's row of an earlier side by side in config.output_dir that compare would reuse (the same settings,
    compare_rows.previous_rows) and that measured this very model (the same directory fingerprint), else None."""
    from dmc_jax.evaluation.compare_rows import previous_rows, source_fingerprint

    fingerprint = source_fingerprint(model_dir)
    return next((r for r in previous_rows(config).values() if r.get("model") == label
                 and r.get("fingerprint") == fingerprint and r.get("logical_cr") is not None), None)


def _eviction_ratios(trained: dict) -> tuple[list, dict]:
    """(the CRs the eviction rows run at, what the result records about them) for the trained model's row: its
    logical CR, and the CR of its bytes when that differs by more than 1%."""
    cr = round(float(trained["logical_cr"]), 2)
    ratios, info = [cr], {}
    bytes_cr = trained.get("bytes_cr")  # dense bytes / its bytes (compare_rows writes it on every row)
    if bytes_cr is not None:
        info["trained_bytes_cr"] = bytes_cr
        if abs(bytes_cr - cr) > 0.01 * cr and round(bytes_cr, 2) >= 1.0:
            info["bytes_ratio"] = round(bytes_cr, 2)
            ratios.append(info["bytes_ratio"])
        elif bytes_cr < 1.0:
            info["bytes_note"] = (f"the trained model's cache allocated more bytes than the dense cache (CR of its "
                                  f"bytes {bytes_cr:.2f}): no eviction row at its memory")
    return ratios, info


def run(config: ml_collections.ConfigDict, model, model_dir: str, label: str) -> dict:
    """Measures the rows (module docstring); returns {'dir', 'rows': [...], 'trained_cr', 'winner'}.

    Two compare passes: the trained model's row (with the dense one), then the eviction rows at the CRs it gives. A
    rerun over the same model starts the first pass with the eviction rows at the CRs of the earlier run's trained
    row, so compare keeps (reuses) them instead of dropping them from rows.json and measuring them again."""
    from dmc_jax.tasks import compare

    out_dir = os.path.join(config.output_dir, "side_by_side")
    os.makedirs(out_dir, exist_ok=True)
    extra = (f"{label}|{model_dir}|{serving_method(config)}",)
    methods = tuple(config.retrofit.get("side_by_side", DEFAULT_METHODS))
    earlier = _previous_trained(compare_config(config, out_dir, (), (), extra), label, model_dir) if methods else None
    first_ratios = _eviction_ratios(earlier)[0] if earlier else []
    first = compare.run(compare_config(config, out_dir, methods if first_ratios else (), tuple(first_ratios),
                                       extra), model)
    trained = next(r for r in first["rows"] if r["model"] == label)
    result = {"dir": out_dir, "rows": first["rows"], "trained_cr": trained.get("logical_cr")}
    if trained.get("logical_cr") is None:
        result["note"] = (f"the trained model's row was not measured ({trained.get('ppl_skipped', 'no perplexity')}); "
                          f"the eviction methods have no CR to match")
        return result
    if methods:
        ratios, info = _eviction_ratios(trained)
        result.update(info)
        if ratios != first_ratios:
            result["rows"] = compare.run(compare_config(config, out_dir, methods, tuple(ratios), extra), model)["rows"]
    result["winner"] = _winner(result["rows"], "ppl", lower=True)
    return result


def _winner(rows, key: str, lower: bool):
    """The row label ('model method') with the best value of key among rows that have it."""
    have = [r for r in rows if r.get(key) is not None and r["method"] != "dense"]
    if not have:
        return None
    best = (min if lower else max)(have, key=lambda r: r[key])
    return f"{best['model']} {best['method']}"


def markdown(result: dict) -> str:
    """The side-by-side table for report.md."""
    lines = ["", "Side by side at the trained model's CR (task compare's protocol: held-out sequences decoded token by "
                 f"token through each cache; rows in {result['dir']}):", "",
             "| model | cache | CR (measured) | MB allocated / seq | decoded perplexity | passkey |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        mb = f"{r['bytes_per_seq'] / 2**20:.2f}" if r.get("bytes_per_seq") else "-"
        cr = f"{r['logical_cr']:.2f}" if r.get("logical_cr") is not None else "-"
        ppl = f"{r['ppl']:.3f}" if r.get("ppl") is not None else r.get("ppl_skipped", r.get("skipped", "-"))
        pk = f"{r['passkey_acc']:.2f}" if r.get("passkey_acc") is not None else "-"
        lines.append(f"| {r['model']} | {r['method']} | {cr} | {mb} | {ppl} | {pk} |")
    if result.get("bytes_ratio"):
        lines += ["", f"Eviction rows at CR {result['trained_cr']:.2f} (the trained model's logical CR: the same number "
                      f"of tokens) and at CR {result['bytes_ratio']:.2f} (dense bytes / the trained model's bytes: the "
                      f"same memory)."]
    elif result.get("trained_bytes_cr", 0) >= 1.0:
        lines += ["", f"Eviction rows at CR {result['trained_cr']:.2f} (the trained model's logical CR); its bytes "
                      f"correspond to CR {result['trained_bytes_cr']:.2f}, within 1%: the same tokens and memory."]
    if result.get("bytes_note"):
        lines += ["", result["bytes_note"] + "."]
    if result.get("note"):
        lines += ["", result["note"]]
    elif result.get("winner"):
        lines += ["", f"Lowest decoded perplexity at this CR: {result['winner']}."]
    return "\n".join(lines) + "\n"
