"""Task `bench`: prefill tokens/s, greedy decode tokens/s per batch size, and the memory-bandwidth floor of decode.

Decode on a CPU is memory bound: every step reads all weights once (plus the KV cache), so the floor is
measured bandwidth / bytes read per step. Numbers are medians over `bench.repeats` runs after a warm-up run.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmc_jax.cache.protocol import state_bytes
from dmc_jax.cache import model_method
from dmc_jax.inference.generate import GenerateConfig, decode_loop, prefill_and_sample


def _median_seconds(fn, repeats: int) -> float:
    fn()  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth_gbs(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second of a jitted full read (sum) of a large fp32 array, in GB/s."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    seconds = _median_seconds(lambda: total(x).block_until_ready(), repeats)
    return n_bytes / seconds / 1e9


def run(config: ml_collections.ConfigDict, model) -> dict:
    b, cfg, params = config.bench, model.cfg, model.params
    method = model_method.make(config)
    text = "The quick brown fox jumps over the lazy dog. " * 200
    ids = model.tokenizer.encode(text)
    param_bytes = int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params)))
    rng = jax.random.PRNGKey(0)
    gen = GenerateConfig(max_new_tokens=b.decode_tokens)

    # Prefill: one sequence of bench.prefill_len tokens through the cache method.
    T = b.prefill_len
    tokens_1T = np.asarray([ids[:T]], np.int32)

    def run_prefill():
        state = method.init(cfg, 1, T + 1)
        first, state = prefill_and_sample(params, tokens_1T, np.array([T], np.int32), state, rng, method, cfg, gen)
        first.block_until_ready()

    prefill_s = _median_seconds(run_prefill, b.repeats)
    results = {"prefill": {"tokens": T, "seconds": prefill_s, "tokens_per_second": T / prefill_s}}
    print(f"prefill   T={T}: {T / prefill_s:8.1f} tokens/s ({prefill_s * 1e3:.1f} ms)")

    gbs = read_bandwidth_gbs()
    results["memory_read_gb_per_s"] = gbs
    results["param_bytes"] = param_bytes
    results["decode"] = {}
    prompt_len = 16
    for B in b.batch_sizes:
        B = int(B)
        tokens_BT = np.asarray([ids[i:i + prompt_len] for i in range(B)], np.int32)
        lengths_B = np.full((B,), prompt_len, np.int32)
        capacity = prompt_len + b.decode_tokens

        def run_decode():
            state = method.init(cfg, B, capacity)
            first, state = prefill_and_sample(params, tokens_BT, lengths_B, state, rng, method, cfg, gen)
            jax.block_until_ready(first)
            start = time.perf_counter()
            out, _, state = decode_loop(params, first, lengths_B, state, rng, method, cfg, gen)
            out.block_until_ready()
            return time.perf_counter() - start, state

        run_decode()  # compile
        timed = [run_decode() for _ in range(b.repeats)]
        seconds = statistics.median(t for t, _ in timed)
        cache_bytes = state_bytes(timed[0][1])
        steps = b.decode_tokens - 1  # the first new token comes from prefill
        per_seq = steps / seconds
        # Each step reads every weight once and, on average, half of the final cache.
        floor = gbs * 1e9 / (param_bytes + cache_bytes / 2)
        results["decode"][B] = {"batch": B, "steps": steps, "seconds": seconds,
                                "tokens_per_second_per_sequence": per_seq,
                                "tokens_per_second_total": per_seq * B,
                                "cache_bytes_allocated": cache_bytes,
                                "memory_floor_steps_per_second": floor,
                                "fraction_of_floor": per_seq / floor}
        print(f"decode    B={B}: {per_seq:8.1f} tokens/s per sequence, {per_seq * B:8.1f} total "
              f"(memory floor {floor:.1f} steps/s at {gbs:.1f} GB/s)")
    return results
