"""Where a distillation training step's time goes, piece by piece (random weights of a published shape, no data):
the teacher's forward, the student's forward + backward (next-token CE, and forward KL to the teacher's logits), the
KL over the vocabulary alone, and the clipped AdamW update of every parameter.

    .venv/bin/python benchmarks/step_breakdown.py [--arch smollm2_135m] [--batch 4] [--seq 256] \\
        [--dtype bfloat16] [--repeats 5] [--json runs/step_breakdown.json]

Each piece is its own jitted program, timed as the median of --repeats calls after one warm-up call, so the pieces
do not add up exactly to a fused training step (XLA overlaps and fuses across them). Run it on a quiet machine.
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
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="smollm2_135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default="runs/step_breakdown.json")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from dmc_jax.model import llama
    from dmc_jax.model.architectures import ARCHITECTURES
    from dmc_jax.model.config import ModelConfig
    from dmc_jax.model.params import init_params
    from dmc_jax.training.distill import forward_kl_rows

    if args.arch not in ARCHITECTURES:
        print(f"step_breakdown.py: error: --arch must be one of {', '.join(sorted(ARCHITECTURES))}", file=sys.stderr)
        return 2
    cfg = ModelConfig(**ARCHITECTURES[args.arch], compute_dtype=args.dtype)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.seq)), jnp.int32)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-4, b1=0.9, b2=0.95, weight_decay=0.0))

    def forward(p, x):
        return llama.forward(p, x, cfg)

    def ce(p, x):
        logits = forward(p, x).astype(jnp.float32)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), x[:, 1:, None], -1))

    def kl(p, x, teacher):
        return forward_kl_rows(teacher, forward(p, x)).mean()

    def update(g, opt, p):
        u, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, u), opt

    forward_j = jax.jit(forward)
    teacher = forward_j(params, tokens)
    grads = jax.jit(jax.grad(ce))(params, tokens)
    opt = tx.init(params)
    pieces = {
        "teacher_forward": (forward_j, (params, tokens)),
        "student_fwd_bwd_ce": (jax.jit(jax.grad(ce)), (params, tokens)),
        "student_fwd_bwd_kl": (jax.jit(jax.grad(kl)), (params, tokens, teacher)),
        "kl_over_vocab_fwd_bwd": (jax.jit(jax.grad(lambda s, t: forward_kl_rows(t, s).mean())), (teacher, teacher)),
        "adamw_update": (jax.jit(update), (grads, opt, params)),
    }
    out = {"arch": args.arch, "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
           "params": cfg.num_params(), "jax": jax.__version__, "seconds": {}}
    for name, (fn, fargs) in pieces.items():
        jax.block_until_ready(fn(*fargs))
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*fargs))
            times.append(time.perf_counter() - t0)
        out["seconds"][name] = statistics.median(times)
        print(f"{name:24s} {out['seconds'][name] * 1000:8.0f} ms", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
