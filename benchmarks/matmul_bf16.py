"""The CPU's bf16 matmul fast path, measured: (n x n) @ (n x n) in bf16 and fp32 under the installed jax.

    python benchmarks/matmul_bf16.py [--n 2048] [--repeats 10] [--out FILE]

Prints GFLOP/s per dtype (median of --repeats after a compiled warm-up) with jax's version and the CPU's bf16
flags, and writes them as JSON. Why it exists: jax/jaxlib 0.12.1 runs this bf16 product at ~0.24 TFLOP/s on the
project's AMX-BF16 machine where 0.12.0.1 runs it at 1.0-1.6, slower than fp32, so a bf16 training step loses its
speed-up (setup.cfg pins jax below 0.12.1; README "Dependencies and why").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        print("matmul_bf16: --n and --repeats must be >= 1", file=sys.stderr)
        return 2

    import jax
    import jax.numpy as jnp
    import jaxlib

    from dmc_jax.model import cpu_features

    result = {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "backend": jax.default_backend(), "n": args.n,
              "bf16_flags": sorted(set(cpu_features.BF16_FLAGS) & cpu_features.cpu_flags()), "gflops": {}}
    product = jax.jit(lambda a, b: a @ b)
    for name, dtype in (("bfloat16", jnp.bfloat16), ("float32", jnp.float32)):
        a = jnp.ones((args.n, args.n), dtype)
        product(a, a).block_until_ready()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            product(a, a).block_until_ready()
            times.append(time.perf_counter() - t0)
        result["gflops"][name] = 2 * args.n ** 3 / statistics.median(times) / 1e9
    print(f"jax {result['jax']} ({result['backend']}), bf16 flags {result['bf16_flags'] or 'none'}: "
          + ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in result["gflops"].items()))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
