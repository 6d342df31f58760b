"""SmolLM2-135M on this CPU: training step, prefill and greedy decode in fp32 and bf16, optionally against
transformers (PyTorch) on the same machine and GGUF; prints the ratios and writes JSON.

    python benchmarks/cpu_speed.py [--repeats 3] [--torch-python /path/to/torch-env/bin/python] [--out FILE]

Measured (medians over --repeats rounds after a warm-up; the rounds alternate fp32, bf16 and, with
--torch-python, one round of benchmarks/cpu_speed_torch.py in its own environment):
  train_step  loss + gradient of the language-model objective, 4 x 256 tokens (fp32 master weights; bf16 =
              model.compute_dtype bfloat16: bf16 matmuls with fp32 accumulation, fp32 gradients)
  prefill     B=1, T=512 through the dense cache (bf16: weights and activations in bf16, fp32 logits)
  decode_B    greedy decode of --decode-tokens after a 16-token prompt, B = 1 and 8, tokens/s per sequence
              (the decode loop only; transformers' generate includes its 16-token prefill)
bf16 matmuls are fast only with AMX-BF16 / AVX512-BF16 (dmc_jax.model.cpu_features); the JSON records the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--parts", default="train_step,prefill,decode")
    ap.add_argument("--torch-python", default="", help="python of an environment with torch + transformers")
    ap.add_argument("--out", default="runs/cpu_speed/results.json")
    args = ap.parse_args(argv)
    parts = set(args.parts.split(","))

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dmc_jax.cache.dense import DenseCache
    from dmc_jax.inference.generate import GenerateConfig, decode_loop, prefill_and_sample
    from dmc_jax.model import cpu_features
    from dmc_jax.model.llama import unstack_layers
    from dmc_jax.training.objective import LanguageModelObjective
    from dmc_jax.weights import load_model
    from dmc_jax.weights.load import embedded_gguf_path

    loaded = load_model("smollm2", False)
    rng = np.random.default_rng(0)
    key = jax.random.PRNGKey(0)
    method = DenseCache()
    V = loaded.cfg.vocab_size
    B, T = 4, 256
    train_batch = {"tokens": jnp.asarray(rng.integers(3, V, (B, T)), jnp.int32),
                   "segment_ids": jnp.ones((B, T), jnp.int32),
                   "positions": jnp.tile(jnp.arange(T, dtype=jnp.int32), (B, 1))}
    prefill_1T = rng.integers(3, V, (1, 512)).astype(np.int32)
    prompts = {b: rng.integers(3, V, (b, 16)).astype(np.int32) for b in (1, 8)}
    gen = GenerateConfig(max_new_tokens=args.decode_tokens)
    master = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), loaded.params))

    def make_timers(dtype):
        """name -> fn() returning seconds of one measurement."""
        cfg = loaded.cfg.replace(compute_dtype=dtype, max_seq_len=2048)
        infer_cfg = cfg.replace(param_dtype=dtype)
        infer = jax.device_put(unstack_layers(jax.tree.map(lambda x: np.asarray(x, infer_cfg.pdtype),
                                                           loaded.params)))
        objective = LanguageModelObjective(cfg)
        grad = jax.jit(jax.value_and_grad(lambda p, b: objective.loss(p, b, None, 0)[0]))
        timers = {}

        def timed(fn):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            return time.perf_counter() - t0

        if "train_step" in parts:
            timers["train_step_s"] = lambda: timed(lambda: grad(master, train_batch))
        if "prefill" in parts:
            def prefill():
                state = method.init(infer_cfg, 1, 513)
                return timed(lambda: prefill_and_sample(infer, prefill_1T, np.array([512], np.int32), state, key,
                                                        method, infer_cfg, gen)[0])
            timers["prefill_s"] = prefill
        if "decode" in parts:
            for b in (1, 8):
                def decode(b=b):
                    lengths = np.full((b,), 16, np.int32)
                    state = method.init(infer_cfg, b, 16 + args.decode_tokens)
                    first, state = prefill_and_sample(infer, prompts[b], lengths, state, key, method, infer_cfg, gen)
                    jax.block_until_ready(first)
                    return timed(lambda: decode_loop(infer, first, lengths, state, key, method, infer_cfg, gen)[0])
                timers[f"decode_B{b}_s"] = decode
        return timers

    dtypes = ("float32", "bfloat16")
    timers = {dt: make_timers(dt) for dt in dtypes}
    flags = sorted(f for f in cpu_features.BF16_FLAGS if f in cpu_features.cpu_flags())
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, bf16 flags {flags}, loadavg {os.getloadavg()}", flush=True)
    for dt in dtypes:  # compile and warm up
        for fn in timers[dt].values():
            fn()
    samples = {dt: {k: [] for k in timers[dt]} for dt in dtypes}
    torch_rounds = []
    for r in range(args.repeats):
        for dt in dtypes:
            for name, fn in timers[dt].items():
                samples[dt][name].append(fn())
        if args.torch_python:
            cmd = [args.torch_python, os.path.join(BENCH_DIR, "cpu_speed_torch.py"), "--gguf", embedded_gguf_path(),
                   "--repeats", "1", "--decode-tokens", str(args.decode_tokens), "--parts", args.parts]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:  # keep our measurements; say why transformers' are missing
                print(f"the transformers benchmark failed (exit {proc.returncode}):\n{proc.stderr[-1500:]}",
                      file=sys.stderr)
            else:
                torch_rounds.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"round {r + 1}/{args.repeats} done, loadavg {os.getloadavg()}", flush=True)

    med = {dt: {k: statistics.median(v) for k, v in samples[dt].items()} for dt in dtypes}
    ours = {}
    for dt in dtypes:
        m = med[dt]
        row = {}
        if "train_step_s" in m:
            row["train_step_s"] = m["train_step_s"]
            row["train_tokens_per_s"] = B * T / m["train_step_s"]
        if "prefill_s" in m:
            row["prefill_tokens_per_s"] = 512 / m["prefill_s"]
        for b in (1, 8):
            if f"decode_B{b}_s" in m:
                row[f"decode_B{b}_tokens_per_s_per_seq"] = (args.decode_tokens - 1) / m[f"decode_B{b}_s"]
        ours[dt] = row
    theirs = {}
    if torch_rounds:
        for dt in dtypes:
            keys = torch_rounds[0][dt].keys()
            theirs[dt] = {k: statistics.median(tr[dt][k] for tr in torch_rounds) for k in keys}
            if "train_step_s" in theirs[dt]:
                theirs[dt]["train_tokens_per_s"] = B * T / theirs[dt]["train_step_s"]

    rows = [("train step 4x256 (s)", "train_step_s", False), ("prefill T=512 (tok/s)", "prefill_tokens_per_s", True),
            ("decode B=1 (tok/s/seq)", "decode_B1_tokens_per_s_per_seq", True),
            ("decode B=8 (tok/s/seq)", "decode_B8_tokens_per_s_per_seq", True)]
    ratios = {}
    print(f"\n{'':26s} {'ours fp32':>10s} {'ours bf16':>10s} {'bf16/fp32':>10s}" +
          (f" {'hf fp32':>10s} {'hf bf16':>10s} {'ours/hf fp32':>12s} {'ours/hf bf16':>12s}" if theirs else ""))
    for label, k, higher in rows:
        if k not in ours["float32"]:
            continue
        speed = (lambda a, b: a / b) if higher else (lambda a, b: b / a)  # > 1 = ours faster
        f, b = ours["float32"][k], ours["bfloat16"][k]
        ratios[k] = {"bf16_over_fp32": speed(b, f)}
        line = f"{label:26s} {f:10.2f} {b:10.2f} {speed(b, f):9.2f}x"
        if theirs and k in theirs["float32"]:
            hf, hb = theirs["float32"][k], theirs["bfloat16"][k]
            ratios[k].update(ours_over_hf_fp32=speed(f, hf), ours_over_hf_bf16=speed(b, hb))
            line += f" {hf:10.2f} {hb:10.2f} {speed(f, hf):11.2f}x {speed(b, hb):11.2f}x"
        print(line)
    print("(ratios > 1: the first named is faster)")
    result = {"ours": ours, "transformers": theirs, "ratios": ratios, "repeats": args.repeats,
              "decode_tokens": args.decode_tokens, "samples_s": samples,
              "torch_rounds": torch_rounds, "jax": jax.__version__, "cpu_count": os.cpu_count(),
              "bf16_flags": flags,
              "loadavg_end": os.getloadavg()}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
