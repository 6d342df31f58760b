"""The weight matmuls of one decode step at SmolLM2-135M's shapes, alone: time per matmul and the weight bytes it
reads per second, for the layer projections (x [B, K] @ w [K, N], dmc_jax.model.linear.dense) and the tied output
projection (dense_transposed, which reads the [V, D] embedding in place). A decode step at small batch reads every
weight once, so it cannot be faster than weight bytes / memory bandwidth; this says how far each matmul is from that.

    .venv/bin/python benchmarks/decode_matmuls.py [--batch 4] [--dtype bfloat16] [--json runs/decode_matmuls.json]

Each layer shape runs as a scan over 30 layers' weights (as the model's scanned decode does), the best of 5 x 10
calls; run it on a quiet machine (the numbers are memory-bound and fall by half beside another job).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LAYERS = 30
SHAPES = {"q / o (576 x 576)": (576, 576), "k / v (576 x 192)": (576, 192), "gate / up (576 x 1536)": (576, 1536),
          "down (1536 x 576)": (1536, 576)}
VOCAB, WIDTH = 49152, 576


def best_ms(f, args, reps: int = 5, calls: int = 10) -> float:
    f(*args).block_until_ready()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(calls):
            r = f(*args)
        r.block_until_ready()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--json", default="")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dmc_jax.model.linear import dense, dense_transposed

    dt = jnp.dtype(a.dtype)
    rng = np.random.default_rng(0)
    rows = []
    for name, (K, N) in SHAPES.items():
        W = jnp.asarray(rng.standard_normal((LAYERS, K, N), np.float32)).astype(dt)
        x = jnp.ones((a.batch, K), dt)

        def step(c, w):  # the result feeds the carry (as a layer's output does), so no call is dropped
            return c + (jnp.mean(dense(c, w, dt, out_dtype=jnp.float32)) * 0).astype(c.dtype), None

        f = jax.jit(lambda x, W: jax.lax.scan(step, x, W)[0])
        ms = best_ms(f, (x, W)) / LAYERS
        rows.append({"matmul": name, "ms": ms, "weight_bytes": K * N * dt.itemsize,
                     "gb_per_s": K * N * dt.itemsize / ms / 1e6})
    E = jnp.asarray(rng.standard_normal((VOCAB, WIDTH), np.float32)).astype(dt)
    h = jnp.ones((a.batch, WIDTH), dt)
    ms = best_ms(jax.jit(lambda h, E: dense_transposed(h, E, dt, out_dtype=jnp.float32)), (h, E))
    rows.append({"matmul": f"output projection ({VOCAB} x {WIDTH}, tied)", "ms": ms,
                 "weight_bytes": VOCAB * WIDTH * dt.itemsize, "gb_per_s": VOCAB * WIDTH * dt.itemsize / ms / 1e6})
    per_layer = {"q / o (576 x 576)": 2, "k / v (576 x 192)": 2, "gate / up (576 x 1536)": 2, "down (1536 x 576)": 1}
    step_ms = sum(r["ms"] * per_layer.get(r["matmul"], 0) for r in rows) * LAYERS + rows[-1]["ms"]
    step_bytes = sum(r["weight_bytes"] * per_layer.get(r["matmul"], 0) for r in rows) * LAYERS + rows[-1]["weight_bytes"]
    print(f"batch {a.batch}, {a.dtype}, {jax.devices()[0].device_kind}")
    for r in rows:
        print(f"  {r['matmul']:<40} {r['ms']:7.3f} ms  {r['gb_per_s']:6.1f} GB/s")
    print(f"  one decode step's weight matmuls: {step_ms:.1f} ms for {step_bytes / 1e6:.0f} MB "
          f"({step_bytes / step_ms / 1e6:.1f} GB/s)")
    if a.json:
        pathlib.Path(a.json).write_text(json.dumps({"batch": a.batch, "dtype": a.dtype, "rows": rows,
                                                    "step_ms": step_ms, "step_bytes": step_bytes}, indent=1))


if __name__ == "__main__":
    main()
