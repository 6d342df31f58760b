"""Training throughput and MFU of the sharded train step (random weights, random tokens; no data, no checkpoints).

    python benchmarks/train_mfu.py --config configs/llama2_7b_dmc.py:cr4 [--steps 10] [--peak_tflops 989] \\
        [--config.train.grad_accum=4 ...]
    sbatch launch/slurm_train.sbatch ... cannot run it; under srun: srun python benchmarks/train_mfu.py --config ...
    python benchmarks/train_mfu.py --smoke          # the tiny model on CPU: checks the harness, not the numbers

Model FLOPs per token = 6 x (non-embedding parameters + lm_head) + 12 x layers x seq_len x heads x head_dim
(matmuls forward and backward; causal attention counted in full, as is customary; remat's recomputation not
counted, so this is MFU, not hardware utilization). MFU = model FLOPs/s / (devices x peak_tflops); the default
peak is an H100 SXM's dense bf16 989 TFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def model_flops_per_token(cfg, seq_len: int) -> float:
    dense = cfg.num_params() - cfg.vocab_size * cfg.embed_dim * (1 if not cfg.tie_embeddings else 0)
    return 6.0 * dense + 12.0 * cfg.num_layers * seq_len * cfg.num_heads * cfg.head_dim


def smoke_argv() -> list[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return ["--config", os.path.join(root, "configs", "smollm2_train.py"), "--config.model.source=tiny",
            "--config.data.seq_len=64", "--config.data.batch_size=4", "--config.train.objective=lm"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up steps)")
    parser.add_argument("--peak_tflops", type=float, default=989.0, help="per device (H100 SXM dense bf16: 989)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, few steps (CPU)")
    args, rest = parser.parse_known_args(argv)
    config_argv = smoke_argv() + rest if args.smoke else rest
    if args.smoke:
        args.steps = min(args.steps, 3)

    from dmc_jax.config_loader import parse_argv
    from dmc_jax.training import distributed

    config = parse_argv(config_argv)
    distributed.initialize(config)  # before any device use
    import jax
    import numpy as np

    from dmc_jax.model.params import init_params, param_shapes, unflatten
    from dmc_jax.tasks.plan import architecture
    from dmc_jax.training import loop
    from dmc_jax.training.objective import make_objective

    cfg = architecture(config)
    abstract = unflatten({p: jax.ShapeDtypeStruct(shape, cfg.pdtype) for p, (shape, _) in param_shapes(cfg).items()})
    s = loop.setup(config, cfg, abstract, make_objective(config.train.objective, config, cfg))
    params = jax.jit(lambda key: init_params(cfg, key), out_shardings=s.param_shardings)(jax.random.PRNGKey(0))
    opt_state = jax.jit(s.tx.init, out_shardings=s.opt_shardings)(params)
    rng = jax.device_put(jax.random.PRNGKey(0), s.replicated)
    B, T = config.data.batch_size // jax.process_count(), config.data.seq_len
    gen = np.random.default_rng(jax.process_index())
    batch = s.put_batch({"tokens": gen.integers(3, cfg.vocab_size, (B, T), dtype=np.int32),
                         "segment_ids": np.ones((B, T), np.int32),
                         "positions": np.tile(np.arange(T, dtype=np.int32), (B, 1))})
    step = 0
    start_step = int(config.get("dmc", {}).get("zero_out_steps", 0)) if config.train.objective == "dmc" else 0
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        params, opt_state, metrics = s.train_step(params, opt_state, batch, rng, np.int32(start_step + i))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t0)
        step += 1
    timed = sorted(times[2:])
    step_s = timed[len(timed) // 2]
    tokens = config.data.batch_size * T
    n = s.mesh.size
    flops = model_flops_per_token(cfg, T) * tokens / step_s
    result = {"model_params": cfg.num_params(), "mesh": dict(s.mesh.shape), "devices": n,
              "platform": jax.devices()[0].platform, "batch": config.data.batch_size, "seq_len": T,
              "grad_accum": config.train.grad_accum, "objective": config.train.objective,
              "step_time_median_s": step_s, "tokens_per_second": tokens / step_s,
              "tokens_per_second_per_device": tokens / step_s / n, "model_tflops_per_device": flops / n / 1e12,
              "mfu": flops / (n * args.peak_tflops * 1e12), "loss": float(metrics["loss"]),
              "compile_and_first_step_s": times[0]}
    if jax.process_index() == 0:
        print(json.dumps(result, indent=1))
    return 0 if math.isfinite(result["loss"]) else 1


if __name__ == "__main__":
    sys.exit(main())
