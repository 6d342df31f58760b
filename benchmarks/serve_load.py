"""Load test of task serve: the same cache memory budget, dense vs DMC (paged, decisions forced to CR c) vs H2O.

    .venv/bin/python benchmarks/serve_load.py [--source tiny] [--requests 32] [--prompt-chars 2048]
        [--max-tokens 256] [--gen-tokens 128] [--dense-rows 4] [--cr 4] [--methods dense,dmc_forced,h2o]
        [--extra 'label|model dir|cache method' ...] [--set cache.dms_paged.threshold=0.35 ...]
        [--time-limit 300] [--json runs/serve_load.json]

For each method the script starts `python -m dmc_jax.main --config configs/smollm2.py --config.task=serve` on
127.0.0.1 (a free port) with serve.cache_mb = the bytes a dense cache needs for --dense-rows sequences of
serve.max_tokens, waits for /health, sends one warm-up request (compiles), then sends --requests requests at once
(prompts: consecutive slices of --prompt-chars characters of the default held-out text; --gen-tokens tokens each,
ignore_eos) and streams them, then stops the server with Ctrl-C (SIGINT). A request still running after
--time-limit seconds is abandoned (the script always stops by itself). Reported per method: requests/s, output
tokens/s (completion tokens of finished requests / wall time from the first send to the last finish), time to
first token p50/p95 (client side: send -> first streamed text), the peak number of sequences decoding at once
(the server's gauge), its rows and pool pages, as JSON (--json) and a table.

Methods: dense; h2o (cache.budget = max_tokens / cr); dmc_forced: the paged DMC cache whose decisions are forced
to CR c (the token at position t appends iff t % c == 0; the key's decision channel is overwritten before the
cache reads it, as benchmarks/dmc_decode.py does), a benchmark-only method this script registers in the server
process (`--serve`); rows are sized for target_cr = c. A retrofitted or distilled model directory (DMC, DMS)
joins the same run at the same cache budget with --extra 'label|<dir>|<method>' (repeatable; method 'auto' = the
directory's own, e.g. a DMS model is served with dms_paged): its server loads <dir> instead of --source. Or
pass --source <dir> --methods auto to serve only that directory.
--source random:<architecture> (e.g. random:smollm2_135m, random:llama2_7b) serves random weights of a published
shape with a byte tokenizer: throughput at a real model's size where its weights are not at hand (a GPU machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import re
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CONFIG = str(ROOT / "configs" / "smollm2.py")


def register_forced_method() -> None:
    """Registers 'dmc_forced': DMCPagedCache with decisions forced to CR forced_cr (benchmark only)."""
    import jax.numpy as jnp

    from dmc_jax.cache import registry
    from dmc_jax.cache.dmc_paged import DMCPagedCache
    from dmc_jax.dmc.config import from_section

    @dataclasses.dataclass(frozen=True)
    class ForcedCR(DMCPagedCache):
        forced_cr: int = 4
        name: str = "dmc_forced"

        def _force(self, k, positions):  # decision logit a = k[ch] - offset: -1e4 appends, +1e4 merges
            a = jnp.where(positions % self.forced_cr == 0, -1e4, 1e4) + self.dmc.decision_offset
            return k.at[..., self.dmc.channel(k.shape[-1])].set(a.astype(k.dtype))

        def prefill(self, state, layer, q, k_BTKD, v, lengths_B, rope, **kw):
            t_1T1 = jnp.arange(k_BTKD.shape[1])[None, :, None]
            return super().prefill(state, layer, q, self._force(k_BTKD, t_1T1), v, lengths_B, rope, **kw)

        def decode(self, state, layer, q, k_BKD, v, positions_B, rope):
            return super().decode(state, layer, q, self._force(k_BKD, positions_B[:, None]), v, positions_B, rope)

    base = registry.get("dmc_paged")
    registry.register(registry.MethodSpec(
        name="dmc_forced", defaults={**base.defaults, "forced_cr": 4},
        build=lambda s, h: ForcedCR(from_section(registry.trained_defaults("dmc")), page_size=s.page_size,
                                    pages=s.pages, target_cr=s.target_cr, margin=s.margin,
                                    on_overflow=s.on_overflow, attend_growth=s.attend_growth, kernels=s.kernels,
                                    forced_cr=s.forced_cr),
        summary="benchmark only: dmc_paged with decisions forced to CR forced_cr"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dense_mib(source: str, max_tokens: int, rows: int) -> float:
    from dmc_jax.cache.dense import DenseCache
    from dmc_jax.serving.sizing import MIB, _bytes
    from dmc_jax.tasks.common import tiny_model
    from dmc_jax.model.architectures import ARCHITECTURES
    from dmc_jax.model.config import ModelConfig
    from dmc_jax.weights import load_model
    from dmc_jax.weights.load import RANDOM_PREFIX

    if source.startswith(RANDOM_PREFIX):  # the shape alone: no weights drawn in this (client) process
        name = source[len(RANDOM_PREFIX):]
        if name not in ARCHITECTURES:
            print(f"serve_load.py: error: --source {source}: unknown architecture; one of "
                  f"{', '.join(sorted(ARCHITECTURES))}", file=sys.stderr)
            raise SystemExit(2)
        cfg = ModelConfig(**ARCHITECTURES[name])
    else:
        cfg = tiny_model(0).cfg if source == "tiny" else load_model(source, False).cfg
    return rows * sum(_bytes(DenseCache(), cfg, 1, max_tokens).values()) / MIB


def _device() -> str:
    """The accelerator the servers ran on (they are started on this machine with the same jax)."""
    import jax

    d = jax.devices()[0]
    return f"{jax.default_backend()}: {d.device_kind}, {jax.device_count()} device(s)"


def _prompts(n: int, chars: int) -> list:
    from dmc_jax.data.default_corpus import heldout_files
    from dmc_jax.evaluation.text_files import read_text

    text = " ".join(" ".join(read_text(f).split()) for f in heldout_files())
    return [text[(i * chars) % (len(text) - chars):][:chars] for i in range(n)]


def _one(url: str, prompt: str, gen_tokens: int, deadline: float) -> dict:
    import httpx

    body = {"model": "bench", "prompt": prompt, "max_tokens": gen_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    start, first, usage, reason = time.perf_counter(), None, None, None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body,
                          timeout=max(1.0, deadline - time.perf_counter())) as r:
            for line in r.iter_lines():
                if time.perf_counter() > deadline:
                    reason = "time limit"
                    break
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for c in chunk.get("choices", []):
                    if c.get("text") and first is None:
                        first = time.perf_counter()
                    reason = c.get("finish_reason") or reason
    except Exception as e:  # noqa: BLE001  a failed request is reported, not fatal
        reason = f"error: {type(e).__name__}"
    end = time.perf_counter()
    return {"start": start, "end": end, "ttft": None if first is None else first - start, "finish": reason,
            "completion_tokens": (usage or {}).get("completion_tokens", 0), "prompt_tokens": (usage or {}).get(
                "prompt_tokens", 0)}


def _metrics(url: str) -> dict:
    import httpx

    out = {}
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name.replace("dmc_serve_", "")] = float(value)
    return out


@dataclasses.dataclass(frozen=True)
class Server:
    """One server of the run: its row label, cache method ('auto': the model directory's) and model source."""

    label: str
    method: str
    source: str


def parse_extra(value: str) -> Server:
    """--extra 'label|model dir|cache method' -> Server; ValueError (one line) when it is not that."""
    parts = [x.strip() for x in value.split("|")]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--extra {value!r} must be 'label|model dir|cache method' (three non-empty fields)")
    label, source, method = parts
    if not os.path.isfile(os.path.join(os.path.expanduser(source), "config.json")):
        raise ValueError(f"--extra {value!r}: {source} is not a model directory (no config.json)")
    from dmc_jax.cache import registry

    if method != registry.AUTO and method not in registry.names():
        raise ValueError(f"--extra {value!r}: unknown cache method {method!r}; one of "
                         f"{', '.join((registry.AUTO,) + registry.names())}")
    return Server(label, method, os.path.expanduser(source))


def run_method(server: Server, args, cache_mib: float, prompts: list) -> dict:
    import httpx

    method, label = server.method, server.label
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)  # the label as a file name
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    overrides = [f"--config.model.source={server.source}", "--config.model.max_seq_len=0",
                 f"--config.serve.port={port}", f"--config.serve.cache_mb={cache_mib}",
                 f"--config.serve.max_tokens={args.max_tokens}", "--config.serve.model_name=bench",
                 f"--config.output_dir={args.run_dir}/{name}"]
    overrides += [f"--config.{kv}" for kv in args.set]
    if method != "auto":
        overrides.append(f"--config.cache.method={method}")
    if method == "dmc_forced":
        overrides += [f"--config.cache.dmc_forced.forced_cr={args.cr}",
                      f"--config.cache.dmc_forced.target_cr={float(args.cr)}"]
    if method in ("h2o", "tova", "streaming_llm", "snapkv"):
        overrides.append(f"--config.cache.budget={args.max_tokens // args.cr}")
    log = open(f"{args.run_dir}/{name}.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, "--serve", *overrides], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
        deadline = time.perf_counter() + args.time_limit
        while time.perf_counter() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        if proc.poll() is not None:
            raise SystemExit(f"the {label} server exited; see {args.run_dir}/{name}.log")
        warm = _one(url, prompts[-1], 4, deadline)  # compiles the prompt bucket; not counted
        before = _metrics(url)
        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: _one(url, p, args.gen_tokens, t0 + args.time_limit), prompts))
        after = _metrics(url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    done = [r for r in results if r["finish"] == "length"]
    wall = max(r["end"] for r in results) - t0
    ttft = sorted(r["ttft"] for r in done if r["ttft"] is not None)
    q = lambda p: ttft[min(len(ttft) - 1, int(p * len(ttft)))] if ttft else None
    return {"method": label, "cache_method": method, "source": server.source, "requests": len(results),
            "completed": len(done), "wall_seconds": wall,
            "requests_per_second": len(done) / wall, "output_tokens_per_second":
                sum(r["completion_tokens"] for r in done) / wall,
            "ttft_p50_seconds": q(0.5), "ttft_p95_seconds": q(0.95),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in done) if done else 0,
            "peak_concurrent_sequences": after.get("peak_active_sequences"), "rows": after.get("rows"),
            "pages": after.get("pages"), "preemptions": after.get("preemptions_total", 0) - before.get(
                "preemptions_total", 0), "cache_bytes": after.get("cache_bytes"), "warmup_finish": warm["finish"],
            "unfinished": [r["finish"] for r in results if r["finish"] != "length"]}


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":  # the server process: the benchmark's method, then main
        register_forced_method()
        from dmc_jax.main import main as dmc_main
        return dmc_main(["--config", CONFIG, "--config.task=serve", *sys.argv[2:]])
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default="tiny")
    p.add_argument("--methods", default="dense,dmc_forced,h2o", help="methods of --source ('' = none)")
    p.add_argument("--extra", action="append", default=[], metavar="'LABEL|DIR|METHOD'",
                   help="also serve model directory DIR with cache method METHOD (auto: its own) at the same cache "
                        "budget, reported as LABEL (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every server, --config.KEY=VALUE (repeatable), e.g. a DMS model's "
                        "cache.dms_paged.threshold=0.3467 (a method's own section only reaches that method)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--prompt-chars", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=2560, help="serve.max_tokens: tokens per sequence")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--dense-rows", type=int, default=4, help="serve.cache_mb = a dense cache of this many rows")
    p.add_argument("--cr", type=int, default=4)
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per method (start + load)")
    p.add_argument("--json", default="runs/serve_load.json")
    args = p.parse_args()
    try:
        servers = [Server(m, m, args.source) for m in args.methods.split(",") if m.strip()]
        servers += [parse_extra(e) for e in args.extra]
    except ValueError as e:
        print(f"serve_load.py: error: {e}", file=sys.stderr)
        return 2
    bad = [kv for kv in args.set if "=" not in kv or not kv.split("=", 1)[0]]
    if bad:
        print(f"serve_load.py: error: --set takes KEY=VALUE (a config key without --config.); got {bad[0]!r}",
              file=sys.stderr)
        return 2
    labels = [s.label for s in servers]
    if not servers or len(set(labels)) != len(labels):
        print(f"serve_load.py: error: the servers' labels must be distinct and at least one; got {labels}",
              file=sys.stderr)
        return 2
    args.run_dir = str(ROOT / "runs" / f"serve_load-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(args.run_dir, exist_ok=True)
    cache_mib = _dense_mib(args.source, args.max_tokens, args.dense_rows)
    prompts = _prompts(args.requests, args.prompt_chars)
    rows = [run_method(server, args, cache_mib, prompts) for server in servers]
    out = {"source": args.source, "cache_mib": cache_mib, "dense_rows": args.dense_rows, "max_tokens": args.max_tokens,
           "requests": args.requests, "prompt_chars": args.prompt_chars, "gen_tokens": args.gen_tokens, "cr": args.cr,
           "device": _device(), "overrides": args.set, "methods": rows}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"cache {cache_mib:.2f} MiB (dense x {args.dense_rows} rows of {args.max_tokens} tokens), "
          f"{args.requests} requests of ~{rows[0]['mean_prompt_tokens']:.0f} prompt + {args.gen_tokens} tokens")
    print("| method | rows | peak seqs | req/s | out tok/s | TTFT p50 s | TTFT p95 s | done | preempt |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda x: "-" if x is None else f"{x:.2f}"
        print(f"| {r['method']} | {r['rows']:.0f} | {r['peak_concurrent_sequences']:.0f} | "
              f"{r['requests_per_second']:.3f} | {r['output_tokens_per_second']:.1f} | {f(r['ttft_p50_seconds'])} | "
              f"{f(r['ttft_p95_seconds'])} | {r['completed']}/{r['requests']} | {r['preemptions']:.0f} |")
    print(f"json: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
