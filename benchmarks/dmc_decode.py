"""Decode tokens/s on CPU: vanilla (dense cache) vs DMC padded vs DMC paged at a forced CR, SmolLM2-135M shapes.

    .venv/bin/python benchmarks/dmc_decode.py [--contexts 2048,4096] [--batch 8] [--cr 4] [--steps 16]
        [--repeats 3] [--page-sizes 16] [--methods vanilla,padded,paged] [--json runs/dmc_decode.json]

Random weights with SmolLM2's dimensions (vocab 49152, width 576, 30 layers, 9 heads on 3 KV heads of 64, MLP 1536,
tied embeddings, fp32), per-layer weight buffers (llama.unstack_layers). Each cache is built directly at the
context, as if a prompt of `ctx` tokens had been prefilled (prefilling 8 x 4k tokens would dominate the run): the
dense cache holds ctx tokens per head, the DMC caches ctx / cr slots per head (every head at the same CR; the
paged pool sized by target_cr = cr and margin 1.25, the padded buffer likewise). Then the real jitted decode loop
(generate.decode_loop) runs `steps` tokens with the DMC decisions FORCED to the same CR: the token at position t
appends iff t % cr == 0 (its key's decision channel is overwritten before the cache reads it), so every cache
does its real per-token work: open-slot update, page allocation at page boundaries, attention over the slots in
use. Reported: decode tokens/s over the batch (median of `repeats` timed runs after a compiling run, the methods
timed round robin so that a shared machine's drift hits them alike), the speed-up over vanilla, the process CPU
time per step (less sensitive to other jobs than wall time), the cache bytes allocated and in use. Writes JSON
(default runs/dmc_decode.json) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmc_jax.cache.dense import DenseCache  # noqa: E402
from dmc_jax.cache.dmc_padded import DMCPaddedCache  # noqa: E402
from dmc_jax.cache.dmc_paged import DMCPagedCache  # noqa: E402
from dmc_jax.cache.protocol import state_bytes  # noqa: E402
from dmc_jax.dmc.config import DMCConfig  # noqa: E402
from dmc_jax.inference.generate import GenerateConfig, decode_loop  # noqa: E402
from dmc_jax.model import llama  # noqa: E402
from dmc_jax.model.config import ModelConfig  # noqa: E402
from dmc_jax.model.params import init_params  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
               mlp_dim=1536, rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192)
MARGIN = 1.25


@dataclasses.dataclass(frozen=True)
class ForcedDecisions:
    """Wraps a DMC cache: the token at position t appends iff t % cr == 0 (benchmark only)."""

    base: object
    cr: int

    @property
    def name(self):
        return self.base.name

    def init(self, cfg, batch, max_tokens):
        return self.base.init(cfg, batch, max_tokens)

    def prefill(self, *args):
        return self.base.prefill(*args)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope):
        dmc = self.base.dmc
        a_B = jnp.where(positions_B % self.cr == 0, -1e4, 1e4)  # decision logit a = k[ch] - c
        ch = dmc.channel(k_BKD.shape[-1])
        k_BKD = k_BKD.at[..., ch].set((a_B[:, None] + dmc.decision_offset).astype(k_BKD.dtype))
        return self.base.decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope)

    def stats(self, state, tokens_B):
        return self.base.stats(state, tokens_B)


def _fill(shape, dtype, seed: float):
    """A cheap non-constant fill (the values do not matter, the traffic does)."""
    row = jnp.sin(jnp.arange(shape[-1], dtype=jnp.float32) * seed) * 0.5
    return jnp.broadcast_to(row, shape).astype(dtype) + jnp.zeros(shape, dtype)


def build_state(kind: str, method, cfg: ModelConfig, B: int, ctx: int, max_tokens: int, cr: int) -> dict:
    """The cache of `method` as if `ctx` tokens per sequence had been prefilled (DMC: ctx / cr slots per head)."""
    state = method.init(cfg, B, max_tokens)
    L, K = cfg.num_layers, cfg.num_kv_heads
    if kind == "vanilla":
        return {"k": _fill(state["k"].shape, cfg.dtype, 0.1), "v": _fill(state["v"].shape, cfg.dtype, 0.2)}
    slots = math.ceil(ctx / cr)
    state["count"] = jnp.full((L, B, K), slots, jnp.int32)
    if kind == "padded":
        state["k"] = _fill(state["k"].shape, cfg.dtype, 0.1)
        state["v"] = _fill(state["v"].shape, cfg.dtype, 0.2)
        return state
    P, N = state["pool_k"].shape[:2]
    M = state["table"].shape[3]
    per_head = math.ceil(slots / N)
    used = L * B * K * per_head
    assert used <= P, (used, P)
    heads_X = jnp.arange(L * B * K, dtype=jnp.int32)[:, None]
    pages_XM = jnp.where(jnp.arange(M)[None] < per_head, heads_X * per_head + jnp.arange(M)[None], -1)
    state["table"] = pages_XM.reshape(L, B, K, M)
    state["top"] = jnp.int32(P - used)  # free[:top] = pages P-1 .. used, the ones not handed out
    state["pool_k"] = _fill(state["pool_k"].shape, cfg.dtype, 0.1)
    state["pool_v"] = _fill(state["pool_v"].shape, cfg.dtype, 0.2)
    return state


def make_method(kind: str, cr: int, page_size: int):
    dmc = DMCConfig()  # reference hyper-parameters: window 12, last channel, offset 5
    if kind == "vanilla":
        return DenseCache()
    if kind == "padded":
        return ForcedDecisions(DMCPaddedCache(dmc, target_cr=cr, margin=MARGIN), cr)
    return ForcedDecisions(DMCPagedCache(dmc, page_size=page_size, target_cr=cr, margin=MARGIN), cr)


class Case:
    """One cache method at one context: builds its state and times the jitted decode loop."""

    def __init__(self, params, cfg, kind, cr, page_size, B, ctx, steps):
        self.params, self.cfg, self.kind, self.cr, self.B, self.ctx, self.steps = params, cfg, kind, cr, B, ctx, steps
        self.page_size = page_size
        self.method = make_method(kind, cr, page_size)
        self.gen = GenerateConfig(max_new_tokens=steps + 1)  # the first token comes from "prefill"
        self.lengths_B = jnp.full((B,), ctx, jnp.int32)

    def run(self):
        """(wall seconds, process CPU seconds, final state) of one decode loop of `steps` tokens."""
        state = jax.block_until_ready(build_state(self.kind, self.method, self.cfg, self.B, self.ctx,
                                                  self.ctx + self.steps + 1, self.cr))
        first_B, rng = jnp.ones((self.B,), jnp.int32), jax.random.PRNGKey(0)
        start, cpu = time.perf_counter(), time.process_time()
        out, _, state = decode_loop(self.params, first_B, self.lengths_B, state, rng, self.method, self.cfg, self.gen)
        jax.block_until_ready((out, state))
        return time.perf_counter() - start, time.process_time() - cpu, state

    def row(self, first_s: float, timed: list, state) -> dict:
        times = [t for t, _ in timed]
        seconds, cpu_seconds = statistics.median(times), statistics.median(c for _, c in timed)
        kind, steps = self.kind, self.steps
        row = {"method": kind if kind != "paged" else f"paged{self.page_size}", "ctx": self.ctx, "batch": self.B,
               "steps": steps, "cr": 1 if kind == "vanilla" else self.cr, "seconds": seconds, "all_seconds": times,
               "first_run_seconds": first_s, "tokens_per_second": self.B * steps / seconds,
               "ms_per_step": 1e3 * seconds / steps, "cpu_ms_per_step": 1e3 * cpu_seconds / steps,
               "bytes_allocated": state_bytes(state)}
        tokens_B = self.lengths_B + steps
        if kind == "vanilla":
            return row | {"bytes_in_use": row["bytes_allocated"], "measured_cr": 1.0}
        stats = self.method.stats(state, tokens_B)
        row["bytes_in_use"] = int(stats["bytes_in_use"])
        row["measured_cr"] = float(np.mean(np.asarray(tokens_B)) / np.mean(np.asarray(stats["kept_LBK"])))
        if kind == "paged":
            row.update(bytes_pool=int(stats["bytes_pool"]), bytes_tables=int(stats["bytes_tables"]),
                       pages=int(stats["pages"]), pages_free=int(stats["pages_free"]),
                       refused=int(np.asarray(state["refused"]).sum()))
        return row


def bench_context(params, cfg, cases, cr, B, ctx, steps, repeats) -> list:
    """Compiles every method at `ctx`, then times them round robin (a shared machine drifts: interleave)."""
    runs = [Case(params, cfg, kind, cr, n, B, ctx, steps) for kind, n in cases]
    first = []
    for case in runs:
        start = time.perf_counter()
        state = case.run()[2]
        first.append((time.perf_counter() - start, state))
    timed = [[] for _ in runs]
    for _ in range(repeats):
        for case, out in zip(runs, timed):
            out.append(case.run()[:2])
    rows = [case.row(f[0], t, f[1]) for case, f, t in zip(runs, first, timed)]
    for r in rows:
        runs_s = ", ".join(f"{t:.2f}" for t in r["all_seconds"])
        print(f"  {r['method']:<9} ctx={ctx}: {r['tokens_per_second']:.1f} tokens/s (runs {runs_s} s; first "
              f"{r['first_run_seconds']:.1f} s)", flush=True)
    return rows


def table(rows: list) -> str:
    out = ["method      ctx  batch  CR(measured)  tokens/s  ms/step  vs vanilla | CPU ms/step  vs vanilla | "
           "cache MB allocated / in use"]
    for r in rows:
        out.append(f"{r['method']:<9} {r['ctx']:>5} {r['batch']:>6} {r['measured_cr']:>8.2f}     "
                   f"{r['tokens_per_second']:>8.1f} {r['ms_per_step']:>8.1f} {r.get('speedup', float('nan')):>9.2f}x | "
                   f"{r['cpu_ms_per_step']:>11.1f} {r.get('cpu_speedup', float('nan')):>9.2f}x | "
                   f"{r['bytes_allocated'] / 2 ** 20:>9.1f} / {r['bytes_in_use'] / 2 ** 20:.1f}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--contexts", default="2048,4096")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cr", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16, help="decode steps timed per run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per case (median), after a compiling run")
    ap.add_argument("--page-sizes", default="16")
    ap.add_argument("--methods", default="vanilla,padded,paged")
    ap.add_argument("--layers", type=int, default=SMOLLM2["num_layers"], help="fewer layers for a quick look")
    ap.add_argument("--json", default=str(ROOT / "runs" / "dmc_decode.json"))
    args = ap.parse_args(argv)
    cfg = ModelConfig(**{**SMOLLM2, "num_layers": args.layers})
    params = llama.unstack_layers(init_params(cfg, jax.random.PRNGKey(0)))
    cases = []
    for kind in args.methods.split(","):
        for n in (args.page_sizes.split(",") if kind == "paged" else ["0"]):
            cases.append((kind, int(n)))
    print(f"SmolLM2-135M shapes ({cfg.num_layers} layers), random weights, fp32, batch {args.batch}; DMC decisions "
          f"forced to CR {args.cr} (append iff position % {args.cr} == 0), caches built at the context; "
          f"{args.steps} decode steps per run, median of {args.repeats}; {os.cpu_count()} CPUs (shared)", flush=True)
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        rows += bench_context(params, cfg, cases, args.cr, args.batch, ctx, args.steps, args.repeats)
        base = next((r for r in rows if r["ctx"] == ctx and r["method"] == "vanilla"), None)
        for r in rows:
            if r["ctx"] == ctx and base:
                r["speedup"] = r["tokens_per_second"] / base["tokens_per_second"]
                r["cpu_speedup"] = base["cpu_ms_per_step"] / r["cpu_ms_per_step"]
    print(table(rows))
    result = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "jax": jax.__version__},
              "model": dataclasses.asdict(cfg), "batch": args.batch, "cr": args.cr, "steps": args.steps,
              "repeats": args.repeats, "decisions": f"forced: append iff position % {args.cr} == 0",
              "rows": rows}
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
