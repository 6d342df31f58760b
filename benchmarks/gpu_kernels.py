"""GPU benchmark of the Pallas kernels against the card's measured ceilings and the XLA / cuDNN baselines.

    python benchmarks/gpu_kernels.py [--json PATH] [--sections ceilings,decode,train,e2e] [--steps 32] [--smoke]

Sections (each row: time, and achieved bandwidth or FLOP/s as a fraction of the measured ceiling):
    ceilings  device-to-device copy bandwidth (bytes read + written) and the bf16 matmul rate (8192^3)
    decode    paged decode attention, Llama-2-7B heads (32 x 128) and a GQA 32:8 case, context 4096 at CR 1, 2, 4,
              8 (ragged per-head counts), pages of 16 and 64: the Pallas kernel vs the XLA reference (dense gather
              of the pages + decode_attention); bandwidth counts the pages in use once
    train     DMC training attention, T = 4096, bf16, forward and forward + backward: the Pallas flash kernel vs
              the XLA masked version (grouped_attention with the T x T bias, as in dmc_core) and
              jax.nn.dot_product_attention with cuDNN (causal only, no DMC mask: the speed to aim for); FLOPs count
              the causal half; "8 docs": the Pallas kernel with 8 packed documents (segment ids; ~1/8 of the work)
    e2e       decode throughput (tokens/s) of a Llama-2-7B-shaped model (random bf16 weights) with a context of
              2048 tokens at the largest batch whose cache fits: vanilla (dense cache, XLA attention) vs DMC with
              decisions forced to CR 2, 4, 8 (every CR-th token appends; accumulate = running mean + re-rotated
              overwrite of the last slot) on a paged pool read by the Pallas kernel; paged CR 1 as control
Runs on the H100 image (jax 0.11.2): imports only jax, numpy, pallas_kernels and dmc_jax modules without
ml-collections / grain / gguf. Prints a table last and writes JSON (default runs/gpu_kernels.json).
--smoke: tiny shapes in interpret mode on CPU, to check the harness without a GPU (numbers meaningless).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import math
import pathlib
import statistics
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Let the allocator have most of the card (JAX reserves 75% by default): "the largest batch that fits in 80 GB".
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.94")
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dmc_jax import kernels as dispatch  # noqa: E402
from dmc_jax.cache.dense import DenseCache  # noqa: E402
from dmc_jax.cache.protocol import state_bytes  # noqa: E402
from dmc_jax.dmc.attention import penalty_vector  # noqa: E402
from dmc_jax.dmc.config import DMCConfig  # noqa: E402
from dmc_jax.model import llama  # noqa: E402
from dmc_jax.model.attention import causal_mask, grouped_attention  # noqa: E402
from dmc_jax.model.config import ModelConfig  # noqa: E402
from dmc_jax.model.params import init_params  # noqa: E402
from pallas_kernels import dmc_flash_attention, dmc_flash_flops, paged_decode, paged_decode_bytes  # noqa: E402

BF16 = jnp.bfloat16
DECODE_VARIANTS = [(64, 4), (128, 4), (128, 8)]          # (tokens per inner step, warps)
FLASH_VARIANTS = [(64, 64, 4), (128, 64, 8), (64, 128, 8)]  # (block_q, block_k, warps)
LLAMA2_7B = dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                 mlp_dim=11008, rope_theta=10000.0, max_seq_len=4096, param_dtype="bfloat16",
                 compute_dtype="bfloat16")


# ------------------------------------------------------------------------------------------------------ timing
def timeit(fn, arg_sets, iters: int = 10, rounds: int = 5) -> float:
    """Median seconds per call: `iters` asynchronous calls per round (rotating input sets), after a warm-up."""
    jax.block_until_ready(fn(*arg_sets[0]))
    jax.block_until_ready(fn(*arg_sets[-1]))
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = [fn(*arg_sets[i % len(arg_sets)]) for i in range(iters)]
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def pattern(shape, dtype, salt: float = 0.0):
    """Non-zero, non-constant device data, fused from iotas (no full-size fp32 temporary; never time on zeros)."""
    def make():
        acc = jnp.full(shape, salt, jnp.float32)
        for d, c in enumerate((0.7071, 0.3183, 0.5772, 0.1414, 0.2718, 0.6931)[:len(shape)]):
            acc = acc + jax.lax.broadcasted_iota(jnp.float32, shape, d) * c
        return jnp.sin(acc).astype(dtype)
    return jax.jit(make)()


def _best_pallas(row: dict, frac: str) -> dict:
    """Copies the fastest pallas_<variant> timing to pallas_s / pallas_<frac> and names it in pallas_variant."""
    timed = [(row[k], k[:-2]) for k in row if k.startswith("pallas_") and k.endswith("_s")]
    if timed:
        t, name = min(timed)
        row.update(pallas_s=t, pallas_variant=name[len("pallas_"):],
                   pallas_rel_err=max(row.get(f"{n}_rel_err", 0.0) for _, n in timed))
        row[f"pallas_{frac}"] = row[f"{name}_{frac}"]
    elif any(k.startswith("pallas_") and k.endswith("_error") for k in row):
        row["pallas_error"] = next(row[k] for k in row if k.startswith("pallas_") and k.endswith("_error"))
    return row


def _rel(a, b) -> float:
    """||a - b|| / ||b|| in fp32 (NaN if a is not finite)."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    if not bool(jnp.all(jnp.isfinite(a))):
        return float("nan")
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _err(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


# ---------------------------------------------------------------------------------------------------- ceilings
def ceilings(smoke: bool) -> dict:
    n = (1 << 16) if smoke else (1 << 30)  # 2 GiB of bf16
    xs = [(pattern((n,), BF16, s),) for s in (0.0, 1.0)]
    copy = jax.jit(lambda x: -x)
    t = timeit(copy, xs)
    bw = 2 * n * 2 / t
    m = 256 if smoke else 8192
    ab = [(pattern((m, m), BF16, s), pattern((m, m), BF16, s + 0.5)) for s in (0.0, 1.0, 2.0)]
    mm = jax.jit(lambda a, b: a @ b)
    t_mm = timeit(mm, ab)
    return {"copy_bytes_per_s": bw, "bf16_matmul_flops": 2 * m ** 3 / t_mm, "copy_s": t, "matmul_s": t_mm}


# ------------------------------------------------------------------------------------------------------ decode
def decode_case(B, K, G, Dh, N, ctx, cr, seed, interpret):
    """Pool, block table and ragged counts (ctx / cr x U[0.5, 1.5], at least 1) for one decode case."""
    rng = np.random.default_rng(seed)
    mean = max(1, ctx // cr)
    count = np.clip((mean * rng.uniform(0.5, 1.5, size=(B, K))).astype(np.int32), 1, None)
    M = int(-(-count.max() // N))
    pages = np.maximum(1, -(-count // N))
    P = int(pages.sum()) + 1
    table = np.zeros((B, K, M), np.int32)
    ids = rng.permutation(P - 1) + 1  # pages scattered over the pool, page 0 unused
    at = 0
    for b in range(B):
        for k in range(K):
            table[b, k, :pages[b, k]] = ids[at:at + pages[b, k]]
            at += pages[b, k]
    q = pattern((B, K * G, Dh), BF16, seed)
    pk, pv = pattern((P, N, Dh), BF16, seed + 0.3), pattern((P, N, Dh), BF16, seed + 0.6)
    return q, pk, pv, jnp.asarray(table), jnp.asarray(count)


def bench_decode(ceil: dict, smoke: bool) -> list:
    rows = []
    interpret = jax.default_backend() != "gpu"
    heads = [(32, 1, 128), (8, 4, 128)] if not smoke else [(2, 2, 16)]
    B, ctx = (32, 4096) if not smoke else (2, 64)
    for K, G, Dh in heads:
        for N in ((16, 64) if not smoke else (16,)):
            for cr in (1, 2, 4, 8):
                case = decode_case(B, K, G, Dh, N, ctx, cr, seed=cr, interpret=interpret)
                byts = paged_decode_bytes(B, K * G, Dh, case[4], N, 2)
                xla = jax.jit(lambda *a: dispatch.paged_decode_attention(*a, kernels="xla"))
                row = {"section": "decode", "B": B, "K": K, "G": G, "Dh": Dh, "page": N, "ctx": ctx, "cr": cr,
                       "bytes": byts}
                impls = [("xla", xla)]
                for tokens, warps in DECODE_VARIANTS[:1 if smoke else None]:
                    kw = dict(pages_per_block=max(1, tokens // N), num_warps=warps, interpret=interpret)
                    impls.append((f"pallas_t{tokens}w{warps}", jax.jit(lambda *a, kw=kw: paged_decode(*a, **kw))))
                want = None
                for name, fn in impls:
                    try:
                        got = jax.block_until_ready(fn(*case))
                        want = got if name == "xla" else want
                        if want is not None and name != "xla":  # correct before fast: fresh inputs, vs XLA
                            row[f"{name}_rel_err"] = _rel(got, want)
                        t = timeit(fn, [case], iters=5 if smoke else 20)
                        row[f"{name}_s"] = t
                        row[f"{name}_bw_frac"] = byts / t / ceil["copy_bytes_per_s"]
                    except Exception as e:  # noqa: BLE001 - a failed baseline is a result, not a crash
                        row[f"{name}_error"] = _err(e)
                rows.append(_best_pallas(row, "bw_frac"))
    return rows


# ------------------------------------------------------------------------------------------------------- train
def bench_train(ceil: dict, smoke: bool) -> list:
    rows = []
    interpret = jax.default_backend() != "gpu"
    B, T = (2, 4096) if not smoke else (1, 64)
    heads = [(32, 1, 128), (8, 4, 128)] if not smoke else [(2, 2, 16)]
    dmc = DMCConfig(mode="train")
    for K, G, Dh in heads:
        H = K * G
        q, k, v = pattern((B, T, H, Dh), BF16, 0.1), pattern((B, T, K, Dh), BF16, 0.2), pattern((B, T, K, Dh), BF16, 0.3)
        z = pattern((B, T, K), jnp.float32, 0.4) * 4.0 - 2.0
        alpha = jax.nn.sigmoid(z).at[:, 0].set(0.0)
        pen = penalty_vector(alpha, z, dmc)
        index = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask, below = causal_mask(index, index), jnp.arange(T)[None, :] < jnp.arange(T)[:, None]
        docs8 = index // (T // 8)  # 8 packed documents: the kernel skips the blocks between them

        def pallas_fn(q, k, v, pen, bq, bk, warps):
            return dmc_flash_attention(q, k, v, pen, None, block_q=bq, block_k=bk, num_warps=warps,
                                       interpret=interpret)

        def xla_fn(q, k, v, pen):
            # dmc_core's XLA form: grouped_attention with the T x T bias (== merge_penalty, see the tests)
            bias = jnp.where(below[None, None], pen[:, :, None, :], 0.0)
            return grouped_attention(q, k, v, mask, bias)

        def cudnn_fn(q, k, v, pen):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

        impls = [("xla", xla_fn)] + ([("cudnn", cudnn_fn)] if not smoke else [])
        for bq, bk, warps in (FLASH_VARIANTS if not smoke else [(16, 16, 4)]):
            fn = lambda q, k, v, pen, bq=bq, bk=bk, warps=warps: pallas_fn(q, k, v, pen, bq, bk, warps)
            impls.append((f"pallas_q{bq}k{bk}w{warps}", fn))
        bq, bk, warps = FLASH_VARIANTS[0] if not smoke else (16, 16, 4)
        impls.append(("packed8", lambda q, k, v, pen: dmc_flash_attention(
            q, k, v, pen, docs8, block_q=bq, block_k=bk, num_warps=warps, interpret=interpret)))
        for backward in (False, True):
            flops = dmc_flash_flops(B, T, H, Dh, backward=False) + (
                dmc_flash_flops(B, T, H, Dh, backward=True) if backward else 0.0)
            row = {"section": "train", "B": B, "T": T, "K": K, "G": G, "Dh": Dh,
                   "pass": "fwd+bwd" if backward else "fwd", "flops": flops}
            want = None
            for name, fn in impls:
                if backward:
                    loss = lambda q, k, v, pen, fn=fn: jnp.sum(fn(q, k, v, pen).astype(jnp.float32))
                    run = jax.jit(jax.grad(loss, argnums=(0, 1, 2) if name == "cudnn" else (0, 1, 2, 3)))
                else:
                    run = jax.jit(fn)
                try:
                    got = jax.block_until_ready(run(q, k, v, pen))
                    want = got if name == "xla" else want
                    if want is not None and name.startswith("pallas"):  # vs the XLA masked version (no docs)
                        row[f"{name}_rel_err"] = max(_rel(a, b) for a, b in zip(jax.tree.leaves(got),
                                                                              jax.tree.leaves(want)))
                    t = timeit(run, [(q, k, v, pen)], iters=2 if smoke else 10)
                    row[f"{name}_s"] = t
                    row[f"{name}_flops_frac"] = flops / t / ceil["bf16_matmul_flops"]
                except Exception as e:  # noqa: BLE001
                    row[f"{name}_error"] = _err(e)
            rows.append(_best_pallas(row, "flops_frac"))
    return rows


# --------------------------------------------------------------------------------------------------------- e2e
@dataclasses.dataclass(frozen=True)
class ForcedPagedDMC:
    """Benchmark-only cache method: DMC decode on a paged pool with decisions forced to one CR.

    Token at position p appends when p % cr == 0, else accumulates into the open slot (running mean of pre-RoPE
    keys / values, re-rotated at p, overwriting the last slot), then the Pallas kernel attends over the slots in
    use. State: pool_k / pool_v [P, N, Dh] shared by every (layer, sequence, head), table [L, B, K, M], count
    [L, B, K], mk / mv [L, B, K, Dh] fp32 running means, z [L, B, K] their weight. The real paged cache lives in
    dmc_jax/cache/dmc_paged.py; this harness only reproduces its per-token work and memory traffic.
    """

    cr: int
    page: int = 16
    interpret: bool = False
    name: str = "dmc_forced"

    def pages_per_head(self, max_tokens: int) -> int:
        return -(-(-(-max_tokens // self.cr)) // self.page)

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int, ctx: int):
        L, K, Dh, M = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.pages_per_head(max_tokens)
        P = L * batch * K * M
        table = jnp.arange(P, dtype=jnp.int32).reshape(L, batch, K, M)
        return {"pool_k": pattern((P, self.page, Dh), cfg.dtype, 0.1),
                "pool_v": pattern((P, self.page, Dh), cfg.dtype, 0.2),
                "table": table, "count": jnp.full((L, batch, K), -(-ctx // self.cr), jnp.int32),
                "mk": pattern((L, batch, K, Dh), jnp.float32, 0.3), "mv": pattern((L, batch, K, Dh), jnp.float32, 0.4),
                "z": jnp.full((L, batch, K), float((ctx - 1) % self.cr + 1), jnp.float32)}

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope):
        B, K, _ = k_BKD.shape
        append_B = positions_B % self.cr == 0
        a_BK1 = jnp.broadcast_to(~append_B[:, None, None], (B, K, 1))
        z_BK = jnp.where(a_BK1[..., 0], state["z"][layer] + 1.0, 1.0)
        r_BK1 = (1.0 / z_BK)[..., None]
        mk_BKD = jnp.where(a_BK1, (1 - r_BK1) * state["mk"][layer] + r_BK1 * k_BKD.astype(jnp.float32),
                           k_BKD.astype(jnp.float32))
        mv_BKD = jnp.where(a_BK1, (1 - r_BK1) * state["mv"][layer] + r_BK1 * v_BKD.astype(jnp.float32),
                           v_BKD.astype(jnp.float32))
        count_BK = state["count"][layer] + append_B[:, None].astype(jnp.int32)
        slot_BK = count_BK - 1
        page_BK = jnp.take_along_axis(state["table"][layer], (slot_BK // self.page)[..., None], axis=2)[..., 0]
        key_BKD = rope(mk_BKD.astype(k_BKD.dtype)[:, None], positions_B[:, None])[:, 0]
        new = dict(state)
        new["pool_k"] = state["pool_k"].at[page_BK, slot_BK % self.page].set(key_BKD.astype(state["pool_k"].dtype))
        new["pool_v"] = state["pool_v"].at[page_BK, slot_BK % self.page].set(mv_BKD.astype(state["pool_v"].dtype))
        for name, x in (("count", count_BK), ("mk", mk_BKD), ("mv", mv_BKD), ("z", z_BK)):
            new[name] = state[name].at[layer].set(x)
        q_BHD = rope(q_BHD[:, None], positions_B[:, None])[:, 0]
        out_BHD = paged_decode(q_BHD, new["pool_k"], new["pool_v"], state["table"][layer], count_BK,
                               interpret=self.interpret)
        return out_BHD, new


def _decode_loop(cfg, method, steps):
    def run(params, state, tokens_B, positions_B):
        def body(_, carry):
            state, tokens_B, positions_B = carry
            logits_BV, state = llama.decode_step(params, tokens_B, positions_B, state, method, cfg)
            return state, jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), positions_B + 1
        return jax.lax.fori_loop(0, steps, body, (state, tokens_B, positions_B))
    return jax.jit(run, donate_argnums=(1,))


def bench_e2e(smoke: bool, steps: int) -> list:
    cfg = ModelConfig(**LLAMA2_7B) if not smoke else ModelConfig(**{**LLAMA2_7B, "vocab_size": 256, "embed_dim": 64,
                                                                    "num_layers": 2, "num_heads": 4,
                                                                    "num_kv_heads": 4, "head_dim": 16,
                                                                    "mlp_dim": 128})
    ctx = 2048 if not smoke else 40
    interpret = jax.default_backend() != "gpu"
    params = llama.unstack_layers(init_params(cfg, jax.random.PRNGKey(0)))
    weight_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 80 * 2 ** 30)
    budget = 0.9 * limit - weight_bytes - (3 * 2 ** 30 if not smoke else 0)
    L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
    max_tokens = ctx + 2 * steps  # a warm-up run, then the timed run continues from where it stopped
    rows = []
    methods = [("vanilla", None), ("dmc_cr1_paged", 1), ("dmc_cr2", 2), ("dmc_cr4", 4), ("dmc_cr8", 8)]
    for label, cr in methods:
        if cr is None:
            method = DenseCache()
            per_seq = 2 * L * K * max_tokens * Dh * 2
        else:
            method = ForcedPagedDMC(cr=cr, interpret=interpret)
            per_seq = 2 * L * K * method.pages_per_head(max_tokens) * method.page * Dh * 2 + 3 * L * K * (Dh + 1) * 4
        batch = max(1, int(budget // per_seq) // 8 * 8) if not smoke else 2
        row = {"section": "e2e", "method": label, "cr": cr or 1, "ctx": ctx, "steps": steps}
        while batch >= 1:
            try:
                if cr is None:  # a non-zero history for the dense cache too, allocated once (no zeros first)
                    shapes = jax.eval_shape(lambda: method.init(cfg, batch, max_tokens))
                    state = {n: pattern(x.shape, x.dtype, i + 0.5) for i, (n, x) in enumerate(shapes.items())}
                else:
                    state = method.init(cfg, batch, max_tokens, ctx)
                run = _decode_loop(cfg, method, steps)
                tokens = jnp.ones((batch,), jnp.int32)
                positions = jnp.full((batch,), ctx, jnp.int32)
                tokens2, positions2 = jnp.full((batch,), 2, jnp.int32), positions + steps
                cache_bytes = state_bytes(state)
                state, _, _ = jax.block_until_ready(run(params, state, tokens, positions))  # compile + warm-up
                t0 = time.perf_counter()
                state, _, _ = jax.block_until_ready(run(params, state, tokens2, positions2))
                dt = time.perf_counter() - t0
                row.update(batch=batch, cache_gib=cache_bytes / 2 ** 30, s=dt, tokens_per_s=batch * steps / dt,
                           ms_per_step=1e3 * dt / steps)
                break
            except Exception as e:  # noqa: BLE001 - out of memory: a smaller batch and retry
                state = None
                if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
                    batch = int(batch * 0.8) // 8 * 8 if batch > 8 else batch // 2
                    row["retried_oom"] = row.get("retried_oom", 0) + 1
                    continue
                row["error"] = _err(e)
                traceback.print_exc()
                break
        rows.append(row)
    base = next((r.get("tokens_per_s") for r in rows if r["method"] == "vanilla"), None)
    for r in rows:
        if base and r.get("tokens_per_s"):
            r["speedup_vs_vanilla"] = r["tokens_per_s"] / base
    return rows


# ---------------------------------------------------------------------------------------------------- printing
def table(rows: list, ceil: dict) -> str:
    out = [f"device: {jax.devices()[0].device_kind}  jax {jax.__version__}",
           f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e9:.0f} GB/s, bf16 matmul "
           f"{ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s"]
    fmt = lambda r, n: (f"{1e6 * r[n + '_s']:9.1f}us" if n + "_s" in r
                        else f"{'ERR' if n + '_error' in r else '-':>11}")
    dec = [r for r in rows if r["section"] == "decode"]
    if dec:
        out.append("decode attention (per layer)   K  G page CR |   pallas   BW%  |      xla   BW%  | speedup"
                   "  best variant, max rel err of all variants vs xla")
        for r in dec:
            bw = lambda n: f"{100 * r[n + '_bw_frac']:5.1f}" if n + "_bw_frac" in r else "  -  "
            sp = f"{r['xla_s'] / r['pallas_s']:6.2f}x" if "pallas_s" in r and "xla_s" in r else "   -"
            out.append(f"  B={r['B']:<3} ctx={r['ctx']:<5}            {r['K']:>3} {r['G']:>2} {r['page']:>4} "
                       f"{r['cr']:>2} | {fmt(r, 'pallas')} {bw('pallas')} | {fmt(r, 'xla')} {bw('xla')} | {sp}"
                       f"  {r.get('pallas_variant', '')} {r.get('pallas_rel_err', float('nan')):.1e}")
    tr = [r for r in rows if r["section"] == "train"]
    if tr:
        out.append("training attention           K  G pass    |   pallas  MFU%  |      xla  MFU%  |    cudnn  MFU%"
                   "  best variant, max rel err (out or grads) vs xla")
        for r in tr:
            fr = lambda n: f"{100 * r[n + '_flops_frac']:5.1f}" if n + "_flops_frac" in r else "  -  "
            out.append(f"  B={r['B']} T={r['T']:<5}           {r['K']:>3} {r['G']:>2} {r['pass']:<7} | "
                       f"{fmt(r, 'pallas')} {fr('pallas')} | {fmt(r, 'xla')} {fr('xla')} | {fmt(r, 'cudnn')} "
                       f"{fr('cudnn')}  {r.get('pallas_variant', '')} {r.get('pallas_rel_err', float('nan')):.1e}"
                       f"  8 docs: {fmt(r, 'packed8')}")
    e2e = [r for r in rows if r["section"] == "e2e"]
    if e2e:
        out.append("end-to-end decode, Llama-2-7B shape   batch  cache GiB  ms/step   tokens/s  vs vanilla")
        for r in e2e:
            if "tokens_per_s" in r:
                out.append(f"  {r['method']:<15} ctx={r['ctx']:<5}       {r['batch']:>5} {r['cache_gib']:10.1f} "
                           f"{r['ms_per_step']:8.2f} {r['tokens_per_s']:10.0f} "
                           f"{r.get('speedup_vs_vanilla', float('nan')):10.2f}x")
            else:
                out.append(f"  {r['method']:<15} {r.get('error', 'no result')}")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=str(ROOT / "runs" / "gpu_kernels.json"))
    ap.add_argument("--sections", default="ceilings,decode,train,e2e")
    ap.add_argument("--steps", type=int, default=32, help="decode steps timed in the end-to-end section")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode: checks the harness on CPU")
    args = ap.parse_args(argv)
    if jax.default_backend() != "gpu" and not args.smoke:
        print(f"gpu_kernels.py needs a CUDA GPU (jax backend is {jax.default_backend()!r}, devices "
              f"{jax.devices()}); run it on the H100 machine, or pass --smoke to check the harness on CPU.",
              file=sys.stderr)
        return 2
    sections = set(args.sections.split(","))
    ceil = ceilings(args.smoke)
    rows = []
    if "decode" in sections:
        rows += bench_decode(ceil, args.smoke)
    if "train" in sections:
        rows += bench_train(ceil, args.smoke)
    if "e2e" in sections:
        rows += bench_e2e(args.smoke, 4 if args.smoke else args.steps)
    result = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "smoke": args.smoke,
              "ceilings": ceil, "rows": rows}
    path = pathlib.Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=float))
    print(table(rows, ceil))
    print(f"wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
