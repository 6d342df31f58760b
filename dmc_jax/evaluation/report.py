"""Human-readable outputs of an evaluation: the CR heatmap (PNG) and the markdown summary of a retrofit."""

from __future__ import annotations

import numpy as np


def cr_heatmap(cr_LK: np.ndarray, path: str, title: str) -> str:
    """Writes a layers x KV heads heatmap of compression ratios to path (PNG); returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, K = cr_LK.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.9 * K, 1.2 + 0.22 * L))
    from matplotlib.colors import LogNorm

    im = ax.imshow(cr_LK, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1.0, vmax=max(float(cr_LK.max()), 1.01)))
    for l in range(L):
        for k in range(K):
            ax.text(k, l, f"{cr_LK[l, k]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if np.log(cr_LK[l, k]) < 0.6 * np.log(max(cr_LK.max(), 1.01)) else "black")
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(K))
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label="compression ratio (log scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(results: dict) -> str:
    """The retrofit summary: one row per model (original, control, the trained method's) plus its cache's
    generation."""
    run = results.get("trained_run", "dmc")
    lines = [f"Held-out text: {results['heldout_tokens']} tokens ({', '.join(results['heldout_files'])}); "
             f"target CR {results['target_cr']}.", "",
             "| model | tokens trained | time in training steps | held-out perplexity | bits/byte | achieved CR |",
             "|---|---|---|---|---|---|"]
    for name in ("original", "control", run):
        if name not in results:
            continue
        r = results[name]
        trained = f"{r['tokens_trained']:,}" if "tokens_trained" in r else "-"
        wall = f"{r['train']['training_seconds']:.0f} s" if "train" in r else "-"
        lines.append(f"| {name} | {trained} | {wall} | {r['perplexity']:.3f} | {r['bits_per_byte']:.4f} | "
                     f"{r['compression_ratio']:.2f} |")
    cal = results.get(run, {}).get("calibration")
    if cal:
        lines += ["", f"Serving threshold {cal['threshold']:+.3f} (a token is evicted when its decision logit "
                      f"exceeds it; training used 0), chosen on {cal['rows']} rows of {cal['tokens']} training tokens "
                      f"so that the model keeps {cal['kept_per_head']:.1f} tokens per head and fills the serving "
                      f"pool's {cal['slots_per_head']:.1f} slots; the held-out row above uses 0. The model "
                      f"directory records it (kv_method.json): a run that serves the directory with another threshold "
                      f"prints a note with the flag that serves it as measured."]
    gen = results.get(run, {}).get("generation")
    if gen:
        lines += ["", f"{gen.get('cache', results.get('method', 'dmc'))} cache during generation: {gen['tokens_seen']} tokens in {gen['slots_kept_mean']:.1f} "
                      f"slots per head on average (CR {gen['cache_cr']:.2f}); {gen['cache_bytes_allocated']:,} bytes "
                      f"allocated vs {gen['dense_cache_bytes_allocated']:,} for the dense cache.",
                  "", f"> {gen['prompt']}", "", gen["completion"]]
    return "\n".join(lines) + "\n"
