"""The compare task's outputs: a markdown table and PNG plots (perplexity vs CR; passkey accuracy by cell)."""

from __future__ import annotations

import math
import os

MC_FMT = "{:.2f}"


def _fmt(x, spec="{:.2f}"):
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else spec.format(x)


def markdown_table(rows: list[dict], mc_tasks) -> str:
    head = ["model", "method", "CR (nominal)", "budget", "ppl (decoded)", "CR (tokens)", "cache MB/seq",
            "CR (bytes)", "passkey acc"] + [f"MC {t}" for t in mc_tasks] + ["seconds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("skipped"):
            cells = [r["model"], r["method"], _fmt(r.get("ratio"), "{:g}"), "-", f"skipped: {r['skipped']}"]
            cells += ["-"] * (len(head) - len(cells))
        else:
            mb = r.get("bytes_per_seq")
            cells = [r["model"], r["method"], _fmt(r.get("ratio"), "{:g}"), _fmt(r.get("budget"), "{}"),
                     _fmt(r.get("ppl"), "{:.3f}"), _fmt(r.get("logical_cr"), "{:.2f}"),
                     _fmt(None if mb is None else mb / 2 ** 20, "{:.2f}"), _fmt(r.get("bytes_cr"), "{:.2f}"),
                     _fmt(r.get("passkey_acc"), "{:.2f}")]
            cells += [_fmt(r.get("mc", {}).get(t)) for t in mc_tasks]
            cells += [_fmt(r.get("seconds"), "{:.0f}")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _label(r: dict) -> str:
    return r["method"] if r["model"] == "base" else f"{r['model']} ({r['method']})"


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r.get("skipped") and r.get("ppl") is not None and r.get("ratio") is not None]


SAME_COLUMN = 1.25  # a trained model's row joins the grid ratio within this factor of its measured CR


def _column(r: dict, grid) -> float:
    """The CR column a row is reported under: its nominal CR, except for a trained method's row (its nominal CR is
    the one it was trained for, whatever its serving threshold or window made of it), which goes under the grid
    ratio nearest its MEASURED CR if one is within a factor SAME_COLUMN, else under its measured CR."""
    cr = r.get("logical_cr")
    if not _trained(r["method"]) or cr is None:
        return float(r["ratio"])
    near = min(grid, key=lambda x: abs(math.log(cr / x)), default=None)
    return near if near is not None and abs(math.log(cr / near)) <= math.log(SAME_COLUMN) else round(float(cr), 2)


def _columns(rows: list[dict]) -> dict:
    """id(row) -> its CR column (see _column); the grid: the nominal CRs of the untrained rows, and 1."""
    grid = sorted({1.0} | {float(r["ratio"]) for r in rows if not _trained(r["method"])})
    return {id(r): _column(r, grid) for r in rows}


def summary_table(rows: list[dict]) -> str:
    """One line per method (or extra model), one column per CR (nominal; a trained model's row under the ratio its
    measured CR is nearest, see _column): 'ppl / passkey / MB per sequence'."""
    rows = _measured(rows)
    col = _columns(rows)
    ratios = sorted(set(col.values()))
    labels = list(dict.fromkeys(_label(r) for r in rows))
    lines = ["| method | " + " | ".join(f"CR {x:g}" for x in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for label in labels:
        cells = []
        for x in ratios:
            hit = [r for r in rows if _label(r) == label and col[id(r)] == x]
            if not hit:
                cells.append("")
                continue
            r = hit[0]
            mb = r.get("bytes_per_seq")
            cells.append(f"{r['ppl']:.2f} / {_fmt(r.get('passkey_acc'))} / "
                         f"{_fmt(None if mb is None else mb / 2 ** 20)}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def winners(rows: list[dict]) -> str:
    """Which method has the lowest decoded perplexity, and the best passkey accuracy, at each CR column > 1 (nominal;
    a trained model's row under the ratio its measured CR is nearest, see _column)."""
    rows = _measured(rows)
    col = _columns(rows)
    out = []
    for x in sorted(v for v in set(col.values()) if v > 1):
        at = [r for r in rows if col[id(r)] == x]
        best = min(at, key=lambda r: r["ppl"])
        line = f"- CR {x:g}: lowest perplexity {_label(best)} ({best['ppl']:.2f}"
        others = sorted(r["ppl"] for r in at if r is not best)
        line += f"; next {others[0]:.2f})" if others else "; the only method at this ratio)"
        keyed = [r for r in at if r.get("passkey_acc") is not None]
        if keyed:
            top = max(r["passkey_acc"] for r in keyed)
            line += f"; best passkey accuracy {top:.2f}: " + ", ".join(_label(r) for r in keyed
                                                                          if r["passkey_acc"] == top)
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


def _trained(method: str) -> bool:
    """A method models are trained for (DMC): its rows are retrofitted models, one per CR."""
    from dmc_jax.cache import registry

    return method in registry.names() and registry.get(method).trained is not None


def plot_ppl(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    dense = [r for r in rows if r["method"] == "dense" and r["model"] == "base" and r.get("ppl")]
    series = {}
    for r in rows:
        if r.get("ppl") is None or r.get("skipped"):
            continue
        if r["model"] == "base" and r["method"] != "dense":
            series.setdefault(r["method"], []).append((r["bytes_cr"], r["ppl"]))
        elif _trained(r["method"]):  # one retrofitted model per CR: one line per trained method
            series.setdefault(f"{r['method']} retrofit", []).append((r["bytes_cr"], r["ppl"]))
    for name, pts in sorted(series.items()):
        pts = sorted(pts + [(1.0, dense[0]["ppl"])] if dense else pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    for r in rows:
        if r["model"] != "base" and r.get("ppl") is not None and not _trained(r["method"]):
            ax.scatter([r["bytes_cr"]], [r["ppl"]], marker="*", s=120, label=f"{r['model']} ({r['method']})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # unconverted KV-head models can be orders of magnitude off
    ax.set_xlabel("compression ratio (cache bytes, dense / method)")
    ax.set_ylabel("perplexity, decoded through the cache")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = [r for r in rows if r.get("passkey")]
    if not rows:
        return
    n = len(rows)
    cols = min(4, n)
    fig, axes = plt.subplots(-(-n // cols), cols, figsize=(3.2 * cols, 2.6 * -(-n // cols)), squeeze=False)
    for ax, r in zip(axes.flat, rows):
        lengths = sorted({c["length"] for c in r["passkey"]})
        depths = sorted({c["depth"] for c in r["passkey"]})
        grid = np.zeros((len(depths), len(lengths)))
        for c in r["passkey"]:
            grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["accuracy"]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=7)
        ax.set_title(f"{r['model']} {r['method']} CR{_fmt(r.get('ratio'), '{:g}')}", fontsize=8)
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.supxlabel("context length (tokens)")
    fig.supylabel("depth")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(out_dir: str, rows: list[dict], mc_tasks) -> dict:
    table = markdown_table(rows, mc_tasks)
    table += ("\nPer method and CR (nominal; a trained model's row under the ratio nearest its measured CR): perplexity "
              "decoded through the cache / passkey accuracy / cache MB per sequence\n\n" + summary_table(rows) + "\n"
              + winners(rows))
    with open(os.path.join(out_dir, "compare.md"), "w", encoding="utf-8") as f:
        f.write(table)
    plot_ppl(rows, os.path.join(out_dir, "ppl_vs_cr.png"))
    plot_passkey(rows, os.path.join(out_dir, "passkey.png"))
    return {"table": os.path.join(out_dir, "compare.md"), "plots": ["ppl_vs_cr.png", "passkey.png"]}
