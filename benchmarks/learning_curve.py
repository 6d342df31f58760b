"""Learning curve of trained KV methods: quality through the cache against training tokens, side by side with the
training-free methods, measured in ONE task-compare run; prints a table and writes JSON and a plot.

    python benchmarks/learning_curve.py --runs runs/dms_cr4,runs/dms_cr4_base [--out runs/learning_curve]
        [--baselines h2o,tova,streaming_llm] [--ratios 4,8] [--also 'label|model dir|cache method' ...]
        [-- --config.cache.dms.capacity=560 ...]

Each run directory holds exports named model<step> (what `train.export_dir=<run>/model<step>` writes: the weights
and kv_method.json); every export becomes an extra model of task compare ('auto': its own method and
hyper-parameters) and is scored with compare's decode-time protocol (held-out text decoded token by token through
the cache, passkey retrieval). Tokens trained = step x data.seq_len x data.batch_size from the run's results.json.
Arguments after `--` go to task compare unchanged (e.g. the DMS buffer size). --also adds rows that are not points
of a curve (e.g. a final export served with another cache method, at the bytes of a baseline) to the same run. The compare run resumes: rerunning
with more exports measures only the new rows, so the curve can grow while a training run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def exports(run_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every model<step> directory of a run that carries kv_method.json, by step."""
    found = []
    for name in os.listdir(run_dir):
        m = re.fullmatch(r"model(\d+)", name)
        path = os.path.join(run_dir, name)
        if m and os.path.exists(os.path.join(path, "kv_method.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def tokens_per_step(run_dir: str) -> int:
    cfg = json.load(open(os.path.join(run_dir, "results.json")))["config"]
    return int(cfg["data"]["seq_len"]) * int(cfg["data"]["batch_size"])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="comma-separated run directories")
    ap.add_argument("--out", default="runs/learning_curve")
    ap.add_argument("--baselines", default="h2o,tova,streaming_llm")
    ap.add_argument("--ratios", default="4,8")
    ap.add_argument("--also", nargs="*", default=[], help="more compare.extra_models entries")
    args = ap.parse_args(argv)

    from dmc_jax.main import main as dmc_main

    runs = [r for r in args.runs.split(",") if r]
    extra, meta = [], {}
    for run in runs:
        name = os.path.basename(os.path.normpath(run))
        found = exports(run) if os.path.isdir(run) else []
        if not found:
            print(f"{run}: no model<step> export yet; skipped", flush=True)
            continue
        per_step = tokens_per_step(run)
        for step, path in found:
            label = f"{name}@{step}"
            extra.append(f"{label}|{path}|auto")
            meta[label] = {"run": name, "step": step, "tokens": step * per_step}
    also = [a for a in args.also if a]
    for spec in also:
        if spec.count("|") != 2:
            print(f"--also entries look like 'label|model dir|cache method'; got {spec!r}", file=sys.stderr)
            return 2
    extra += also
    if not extra:
        print(f"no model<step> exports with kv_method.json under {', '.join(runs)}", file=sys.stderr)
        return 2
    methods = ("dense", *[m for m in args.baselines.split(",") if m])
    ratios = tuple(float(r) for r in args.ratios.split(","))
    compare_dir = os.path.join(args.out, "compare")
    rc = dmc_main(["--config", os.path.join(ROOT, "configs", "smollm2.py"), "--config.task=compare",
                   f"--config.output_dir={compare_dir}", f"--config.compare.methods={methods!r}",
                   f"--config.compare.ratios={ratios!r}", "--config.compare.kv_heads=()",
                   "--config.compare.evals=('ppl','passkey')", "--config.compare.passkey_lengths=(512,)",
                   "--config.compare.passkey_trials=4", f"--config.compare.extra_models={tuple(extra)!r}",
                   *passthrough])
    if rc:
        return rc
    rows = json.load(open(os.path.join(compare_dir, "rows.json")))["rows"]
    curve = {"runs": {}, "baselines": [], "also": []}
    also_labels = {spec.split("|")[0] for spec in also}
    for r in rows:
        point = {k: r.get(k) for k in ("ppl", "logical_cr", "passkey_acc", "bytes_per_seq", "overflow")}
        if r["model"] in meta:
            curve["runs"].setdefault(meta[r["model"]]["run"], []).append({**meta[r["model"]], **point})
        elif r["model"] in also_labels:
            curve["also"].append({"label": r["model"], "method": r["method"], **point})
        elif r["model"] == "base":
            curve["baselines"].append({"method": r["method"], "ratio": r["ratio"], **point})
    for points in curve["runs"].values():
        points.sort(key=lambda p: p["step"])
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "curve.json"), "w") as f:
        json.dump(curve, f, indent=2)
    print("| run | step | tokens | ppl (decoded) | logical CR | passkey | MB/seq | forced out |")
    print("|---|---|---|---|---|---|---|---|")
    for name, points in curve["runs"].items():
        for p in points:
            print(f"| {name} | {p['step']} | {p['tokens'] / 1e3:.0f}k | {_num(p['ppl'])} | {_num(p['logical_cr'])} | "
                  f"{_num(p['passkey_acc'])} | {_num(p['bytes_per_seq'], 2**20)} | {p['overflow'] or 0} |")
    for a in curve["also"]:
        print(f"| {a['label']} ({a['method']}) | - | - | {_num(a['ppl'])} | {_num(a['logical_cr'])} | "
              f"{_num(a['passkey_acc'])} | {_num(a['bytes_per_seq'], 2**20)} | {a['overflow'] or 0} |")
    for b in curve["baselines"]:
        print(f"| {b['method']} (no training) | - | 0 | {_num(b['ppl'])} | {_num(b['logical_cr'])} | "
              f"{_num(b['passkey_acc'])} | {_num(b['bytes_per_seq'], 2**20)} | - |")
    _plot(curve, os.path.join(args.out, "curve.png"))
    print(f"curve: {os.path.join(args.out, 'curve.json')}, {os.path.join(args.out, 'curve.png')}")
    return 0


def _num(x, scale: float = 1.0) -> str:
    """x / scale to 2 decimals, '-' for a value the row does not have (e.g. a skipped measurement)."""
    return "-" if x is None else f"{x / scale:.2f}"


def _plot(curve: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_ppl, ax_key) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curve["runs"].items():
        x = [p["tokens"] for p in points]
        ax_ppl.plot(x, [p["ppl"] for p in points], "o-", label=name)
        for p in points:
            ax_ppl.annotate(f"CR {p['logical_cr']:.1f}", (p["tokens"], p["ppl"]), fontsize=7)
        ax_key.plot(x, [p["passkey_acc"] for p in points], "o-", label=name)
    colors = {}
    for b in curve["baselines"]:
        label = (b["method"] if b["method"] == "dense" else f"{b['method']} (adaptive)" if b["ratio"] is None
                 else f"{b['method']} CR {b['ratio']:g}")
        color = "grey" if b["method"] == "dense" else colors.setdefault(b["method"], f"C{len(colors) + 2}")
        style = "-" if b["method"] == "dense" else ("--" if (b["ratio"] or 1) <= 4 else ":")
        for ax, key in ((ax_ppl, "ppl"), (ax_key, "passkey_acc")):
            if b[key] is not None:
                ax.axhline(b[key], lw=0.9, ls=style, color=color, label=label)
    tops = [p["ppl"] for points in curve["runs"].values() for p in points if p["ppl"] is not None]
    if tops:  # a baseline far off the runs' scale (SnapKV's decoded perplexity) is left above the plot
        ax_ppl.set_ylim(top=max(tops) * 1.15)
    ax_ppl.set(xlabel="training tokens", ylabel="decoded perplexity (512 tokens)", title="quality through the cache")
    ax_key.set(xlabel="training tokens", ylabel="passkey accuracy (512 tokens)", title="passkey retrieval")
    ax_ppl.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
