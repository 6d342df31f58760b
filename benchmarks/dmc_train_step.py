"""Training-step time of DMC's training form against the vanilla model at the same shapes (CPU or GPU).

    .venv/bin/python benchmarks/dmc_train_step.py [--batch 4] [--seq 256] [--layers 30] [--repeats 3]

SmolLM2-135M's shapes with random weights (stacked layers under lax.scan, as training runs them): the median time
of a jitted loss + gradient for vanilla causal attention and for DMC (train mode: Gumbel noise, window 12), and
their ratio. Prints a table and writes runs/dmc_train_step.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dmc_jax.dmc.attention import DMCAttention  # noqa: E402
from dmc_jax.dmc.config import DMCConfig  # noqa: E402
from dmc_jax.model import llama  # noqa: E402
from dmc_jax.model.config import ModelConfig  # noqa: E402
from dmc_jax.model.params import init_params  # noqa: E402


def step_seconds(cfg, params, tokens_BT, attention, repeats: int) -> float:
    def loss(p, rng):
        logits_BTV, _ = llama.forward_aux(p, tokens_BT, cfg, attention=attention, rng=rng)
        return jnp.mean(jax.nn.logsumexp(logits_BTV, -1))

    grad = jax.jit(jax.value_and_grad(loss))
    jax.block_until_ready(grad(params, jax.random.PRNGKey(0)))  # compile
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(grad(params, jax.random.PRNGKey(i + 1)))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/dmc_train_step.json")
    a = ap.parse_args()
    cfg = ModelConfig(vocab_size=49152, embed_dim=576, num_layers=a.layers, num_heads=9, num_kv_heads=3,
                      head_dim=64, mlp_dim=1536, rope_theta=1e5, tie_embeddings=True, max_seq_len=8192)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (a.batch, a.seq), 0, cfg.vocab_size)
    vanilla = step_seconds(cfg, params, tokens_BT, llama.causal_attention, a.repeats)
    dmc = step_seconds(cfg, params, tokens_BT, DMCAttention(DMCConfig(mode="train")), a.repeats)
    result = {"backend": jax.default_backend(), "batch": a.batch, "seq_len": a.seq, "layers": a.layers,
              "vanilla_step_s": vanilla, "dmc_step_s": dmc, "dmc_over_vanilla": dmc / vanilla}
    print(f"{'':10s}{'step (s)':>10s}{'tokens/s':>10s}")
    for name, s in (("vanilla", vanilla), ("dmc", dmc)):
        print(f"{name:10s}{s:10.3f}{a.batch * a.seq / s:10.1f}")
    print(f"DMC / vanilla: {dmc / vanilla:.3f}x")
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
