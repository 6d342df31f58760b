"""Task `compare`: every method x compression ratio through the same decode loop and the same evaluations.

Rows: the base model with the dense cache (CR 1) and with each eviction method at each ratio (budget =
context / CR); the base model converted to fewer KV heads (compare.kv_heads, with the dense cache); and any
compare.extra_models (e.g. a DMC-retrofitted checkpoint with its cache method: the hook for DMC rows). For each:
    (a) perplexity of held-out text DECODED through the cache (dmc_jax.evaluation.decode_perplexity)
    (b) passkey retrieval by context length x depth (budget = length / CR)
    (c) multiple-choice accuracy on local BIG-bench tasks (budget = mc_context / CR)
    (d) cache bytes allocated per sequence (at compare.context tokens) and the bytes CR vs the dense cache
Writes compare.md, ppl_vs_cr.png and passkey.png in the run directory; results.json holds every row.

Cost (SmolLM2-135M, fp32, 2-core CPU): compilation dominates. Each row compiles one decode scan per shape
(perplexity, each passkey length, multiple choice), 30-90 s each, and decodes at ~50 tokens/s at batch 4
(measured with other jobs sharing the cores, so upper bounds). The defaults (22 rows x 4 compilations) are
for a quiet machine or a GPU; a ~15-20 minute CPU run is e.g. compare.ratios=(4,), compare.context=256,
compare.ppl_sequences=2, compare.passkey_lengths=(256,), compare.mc_tasks=('strategyqa',) (9 rows).
"""

from __future__ import annotations

import math
import time

import jax
import ml_collections
import numpy as np

from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.registry import make_method
from dmc_jax.errors import UserError
from dmc_jax.evaluation import bigbench, compare_report
from dmc_jax.evaluation.compare_options import validate
from dmc_jax.evaluation.decode_perplexity import decode_perplexity
from dmc_jax.evaluation.passkey import run_passkey
from dmc_jax.evaluation.text_files import read_text
from dmc_jax.model.llama import unstack_layers


def _rows_of(ids: np.ndarray, n: int, length: int) -> np.ndarray:
    """n rows of `length` tokens spread evenly over ids."""
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    if len(ids) < length:
        raise UserError(f"the evaluation text has {len(ids)} tokens, fewer than compare.context={length}")
    return np.stack([ids[s:s + length] for s in starts])


def _method_factory(config, name: str, ratio):
    """length -> cache method with budget = ceil(length / ratio) (dense: no budget)."""
    def make(length: int):
        if name == "dense" or ratio is None:
            return make_method(_cache_section(config, name, None))
        return make_method(_cache_section(config, name, max(1, math.ceil(length / ratio))))
    return make


def _cache_section(config, name, budget):
    c = ml_collections.ConfigDict(config.cache.to_dict())
    c.method = name
    if budget is not None:
        c.budget = budget
    return c


def _evaluate(config, label, params, cfg, tokenizer, method_name, ratio, wrap, data) -> dict:
    c = config.compare
    make = _method_factory(config, method_name, ratio)
    if wrap is not None:
        base_make = make
        make = lambda length: wrap(base_make(length))
    row = {"model": label, "method": method_name, "ratio": ratio}
    try:
        method = make(c.context)
    except UserError as e:
        return row | {"skipped": str(e)}
    row["budget"] = None if ratio is None or method_name == "dense" else math.ceil(c.context / ratio)
    if row["budget"] is not None and row["budget"] < c.min_budget:
        return row | {"skipped": f"budget {row['budget']} < compare.min_budget"}
    start = time.perf_counter()
    print(f"[compare] {label} {method_name} CR {ratio}", flush=True)
    if "ppl" in c.evals:
        res = decode_perplexity(params, data["ppl_rows"], method, cfg, c.prefix, c.batch)
        row.update(ppl=res.perplexity, logical_cr=res.compression_ratio, bytes_per_seq=res.bytes_allocated_per_sequence,
                   tokens_scored=res.tokens_scored)
        print(f"  perplexity {res.perplexity:.3f}, CR {res.compression_ratio:.2f}, "
              f"{res.bytes_allocated_per_sequence / 2**20:.2f} MB/seq ({res.seconds:.0f} s)", flush=True)
    if "passkey" in c.evals:
        try:
            cells = run_passkey(params, cfg, tokenizer, data["filler"], make, c.passkey_lengths, c.passkey_depths,
                                c.passkey_trials, seed=config.seed)
            row["passkey"] = [{"length": x.length, "depth": x.depth, "accuracy": x.accuracy, "answers": x.answers}
                              for x in cells]
            row["passkey_acc"] = float(np.mean([x.accuracy for x in cells]))
            print(f"  passkey accuracy {row['passkey_acc']:.2f}", flush=True)
        except UserError as e:
            row["passkey_skipped"] = str(e)
    if "mc" in c.evals and data["mc"]:
        try:
            mc_method = make(c.mc_context)
            row["mc"] = {task: bigbench.score_items(params, cfg, items, mc_method, c.mc_context, batch=c.batch * 4)
                         for task, items in data["mc"].items()}
            print(f"  multiple choice {row['mc']}", flush=True)
        except UserError as e:
            row["mc_skipped"] = str(e)
    row["seconds"] = time.perf_counter() - start
    return row


def _data(config, tokenizer) -> dict:
    from dmc_jax.data import default_corpus
    from dmc_jax.kv_heads.convert import default_calibration_files

    c = config.compare
    files = [f.strip() for f in c.text_files.split(",") if f.strip()] or default_corpus.heldout_files()
    ids = np.concatenate([np.asarray(tokenizer.encode(read_text(f)), np.int32) for f in files])
    filler = np.asarray(tokenizer.encode(read_text(default_calibration_files()[0])), np.int32)  # training text
    mc = {}
    if "mc" in c.evals and c.mc_tasks:
        paths = bigbench.ensure_tasks(c.mc_cache_dir, c.mc_tasks)
        mc = {t: bigbench.build_items(tokenizer, bigbench.load_examples(p), c.mc_items, c.mc_context, config.seed)
              for t, p in paths.items()}
    return {"ppl_rows": _rows_of(ids, c.ppl_sequences, c.context), "filler": filler, "mc": mc}


def run(config: ml_collections.ConfigDict, model) -> dict:
    from dmc_jax.kv_heads import convert as kvc
    from dmc_jax.kv_heads.activations import calibration_grams

    c = config.compare
    validate(c)
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"model {model.source} has no tokenizer; compare needs one")
    data = _data(config, tok)
    rows = Rows(config.output_dir, list(c.mc_tasks) if "mc" in c.evals else [])
    rows.append(_evaluate(config, "base", model.params, model.cfg, tok, "dense", 1, None, data))
    for name in c.methods:
        if name != "dense":
            for r in c.ratios:
                rows.append(_evaluate(config, "base", model.params, model.cfg, tok, name, float(r), None, data))
    grams = None
    for spec in c.kv_heads:
        kv_method, rope = spec.split(":")
        if kv_method == "svd_a" and grams is None:
            kh = config.kv_heads
            files = [f.strip() for f in kh.calib_files.split(",") if f.strip()] or kvc.default_calibration_files()
            tokens = kvc.calibration_tokens(tok, files, kh.calib_sequences, kh.calib_seq_len)
            start = time.perf_counter()
            batches = (tokens[i:i + kh.calib_batch] for i in range(0, len(tokens), kh.calib_batch))
            grams = calibration_grams(model.params, model.cfg, batches, kh.new_kv_heads)
            print(f"[compare] calibration on {tokens.shape[0]}x{tokens.shape[1]} tokens "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        conv = kvc.convert_from_config(config.kv_heads, model.cfg, model.params, tok, kv_method, rope, grams)
        params = jax.device_put(unstack_layers(conv.params))
        row = _evaluate(config, f"kv {spec}", params, conv.cfg, tok, "dense", None, conv.wrap, data)
        row["description"] = conv.description
        row["ratio"] = model.cfg.num_kv_heads * model.cfg.head_dim / (conv.cfg.num_kv_heads * conv.cfg.head_dim)
        rows.append(row)
    for spec in c.extra_models:  # the hook for DMC-retrofitted checkpoints (or any other model + method)
        from dmc_jax.tasks.common import load_model

        label, source, method = spec.split("|")
        extra_config = ml_collections.ConfigDict(config.to_dict())
        extra_config.model.source = source
        extra = load_model(extra_config)
        rows += [_evaluate(config, label, extra.params, extra.cfg, tok, method, float(r), None, data)
                 for r in (c.ratios if method != "dense" else (1,))]
    out = rows.write()
    print(open(out["table"]).read())
    return {"rows": list(rows), **out}


class Rows(list):
    """The rows so far; the table is rewritten after each one so a long run shows partial results."""

    def __init__(self, out_dir: str, mc_tasks):
        super().__init__()
        self.out_dir, self.mc_tasks = out_dir, mc_tasks

    def write(self) -> dict:
        dense_bytes = self[0].get("bytes_per_seq") if self else None
        for r in self:
            if r.get("bytes_per_seq") and dense_bytes:
                r["bytes_cr"] = dense_bytes / r["bytes_per_seq"]
        return compare_report.write_all(self.out_dir, list(self), self.mc_tasks)

    def append(self, row) -> None:
        super().append(row)
        self.write()

    def __iadd__(self, rows):
        for row in rows:
            self.append(row)
        return self
