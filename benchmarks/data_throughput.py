"""Input pipeline throughput (tokens/s) against what a CPU training step of SmolLM2-135M consumes.

    .venv/bin/python benchmarks/data_throughput.py [--corpus DIR] [--tokenizer smollm2|byte] [--threads 0,1,2]
        [--batches 150] [--seq-len 512] [--batch 8] [--no-train-step] [--json PATH]

Prepares the corpus (default: the default corpus's training works, 4.9 MB, fetched by scripts/setup.sh; any
directory of .txt/.md files with --corpus) into data_cache/bench_tfds once,
then times the grain pipeline (read, tokenize, pack, shuffle, batch) over --batches batches for each thread count,
after one warm-up batch. The training-step reference is a jitted forward + backward of the causal LM loss of
SmolLM2-135M on one batch (median of 3 after compilation): the part of a training step that scales with tokens.
Prints a table and writes JSON (default runs/data_throughput.json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dmc_jax.data import options, pipeline  # noqa: E402
from dmc_jax.data.prepare import prepare  # noqa: E402


def _tokenizer(name: str):
    if name == "byte":
        from tests.test_data_helpers import ByteTokenizer
        return ByteTokenizer()
    from dmc_jax.weights import load_tokenizer
    return load_tokenizer(name)


def pipeline_tokens_per_second(cfg, tokenizer, batches: int) -> dict:
    """Real (non-padding) tokens per second of the pipeline, after a warm-up batch; time to the first batch."""
    start = time.perf_counter()
    it = pipeline.make_iterator(cfg, tokenizer)
    next(it)
    first = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(it)
        tokens += int((batch["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    return {"tokens_per_second": tokens / seconds, "batches_per_second": batches / seconds, "tokens": tokens,
            "seconds": seconds, "first_batch_seconds": first}


def train_step_tokens_per_second(cfg, tokenizer_name: str, repeats: int = 3) -> dict:
    """Tokens/s of a jitted forward + backward (loss and gradients) of the model on one packed batch."""
    import jax
    import jax.numpy as jnp

    from dmc_jax.data.packing import next_token_targets
    from dmc_jax.model.llama import forward
    from dmc_jax.weights import load_model

    model = load_model(tokenizer_name)
    batch = next(pipeline.make_iterator(cfg, model.tokenizer))
    targets_BT, weights_BT = next_token_targets(batch["tokens"], batch["segment_ids"])

    def loss(params):
        logits_BTV = forward(params, jnp.asarray(batch["tokens"]), model.cfg, jnp.asarray(batch["positions"]),
                             jnp.asarray(batch["segment_ids"]))
        logp_BT = jnp.take_along_axis(jax.nn.log_softmax(logits_BTV), targets_BT[..., None], axis=-1)[..., 0]
        return -(logp_BT * weights_BT).sum() / weights_BT.sum()

    step = jax.jit(jax.value_and_grad(loss))
    start = time.perf_counter()
    jax.block_until_ready(step(model.params))
    compile_seconds = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(step(model.params))
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    return {"step_seconds": seconds, "tokens_per_second": batch["tokens"].size / seconds,
            "compile_seconds": compile_seconds, "params_millions": model.cfg.num_params() / 1e6}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default="", help="a directory of text files ('' = the default corpus's training "
                                                     "works)")
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument("--threads", default="0,1,2")
    parser.add_argument("--batches", type=int, default=150)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--data-dir", default=str(ROOT / "data_cache" / "bench_tfds"))
    parser.add_argument("--no-train-step", action="store_true")
    parser.add_argument("--json", default=str(ROOT / "runs" / "data_throughput.json"))
    args = parser.parse_args(argv)

    cfg = options.default_config()
    if not args.corpus:
        from dmc_jax.data.default_corpus import DEFAULT_CACHE_DIR, ensure_default_corpus, train_dir

        ensure_default_corpus(DEFAULT_CACHE_DIR)
        args.corpus = str(train_dir(DEFAULT_CACHE_DIR))
    cfg.source, cfg.data_dir = args.corpus, args.data_dir
    cfg.seq_len, cfg.batch_size = args.seq_len, args.batch
    tokenizer = _tokenizer(args.tokenizer)
    start = time.perf_counter()
    summary = prepare(cfg, tokenizer)
    prepare_seconds = time.perf_counter() - start
    train = summary["splits"]["train"]
    print(f"corpus {args.corpus}: {train['documents']:,} documents, {train['tokens']:,} tokens, "
          f"{train['bytes_per_token']:.2f} bytes/token ({summary['status']} in {prepare_seconds:.1f} s)")

    results = {"machine": f"{platform.node()} ({os.cpu_count()} cpus)", "corpus": args.corpus,
               "tokenizer": args.tokenizer, "seq_len": args.seq_len, "batch": args.batch,
               "prepare": {"status": summary["status"], "seconds": prepare_seconds, "train": train},
               "pipeline": {}}
    for threads in [int(t) for t in args.threads.split(",")]:
        cfg.num_threads = threads
        r = pipeline_tokens_per_second(cfg, tokenizer, args.batches)
        results["pipeline"][f"threads={threads}"] = r
        print(f"pipeline, {threads} threads: {r['tokens_per_second']:>10,.0f} tokens/s "
              f"({r['batches_per_second']:.1f} batches/s of {args.batch}x{args.seq_len}; first batch "
              f"{r['first_batch_seconds']:.2f} s)")
    if not args.no_train_step:
        cfg.num_threads = 2
        step = train_step_tokens_per_second(cfg, args.tokenizer)
        best = max(r["tokens_per_second"] for r in results["pipeline"].values())
        step["pipeline_over_step"] = best / step["tokens_per_second"]
        results["train_step"] = step
        print(f"train step (forward + backward, {step['params_millions']:.0f}M params): {step['step_seconds']:.2f} s "
              f"per {args.batch}x{args.seq_len} batch = {step['tokens_per_second']:,.0f} tokens/s; the pipeline is "
              f"{step['pipeline_over_step']:.0f}x faster")
    out = pathlib.Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
