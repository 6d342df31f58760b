"""Task `compare`: every method x compression ratio through the same decode loop and the same evaluations.

Rows: the base model with the dense cache (CR 1) and with each eviction method at each ratio (budget =
context / CR; CORM adaptive has no budget: one row at the CR its rule reaches); the base model converted to
fewer KV heads (compare.kv_heads, with the dense cache); and compare.extra_models 'label|source|cache method':
other models with a cache method, e.g. 'dmc|runs/r/dmc/model|dmc_paged' (task retrofit writes that directory
with its dmc_config.json: one row at the CR the model was trained for, the pool sized by it) or an up-trained
GQA model 'gqa|runs/g/uptrained|dense' (task train with train.export_dir). For each row:
    (a) perplexity of held-out text DECODED through the cache (dmc_jax.evaluation.decode_perplexity)
    (b) passkey retrieval by context length x depth (budget = length / CR)
    (c) multiple-choice accuracy on local BIG-bench tasks (budget = mc_context / CR)
    (d) cache bytes allocated per sequence (at compare.context tokens) and the bytes CR vs the dense cache
Writes compare.md (every row, then a method x CR summary and the winner at each CR), ppl_vs_cr.png, passkey.png
and rows.json (after every row) in the run directory; results.json holds every row at the end. Running again with
the same output_dir reuses the rows measured with the same settings (compare.resume): an interrupted grid goes
on where it stopped, and a grid can grow by methods, ratios or models.

Cost (SmolLM2-135M, fp32, 2-core CPU): compilation dominates. Each row compiles one decode scan per shape
(perplexity, each passkey length, multiple choice), 30-90 s each, and decodes at ~50 tokens/s at batch 4
(measured with other jobs sharing the cores, so upper bounds). The defaults (22 rows x 4 compilations) are
for a quiet machine or a GPU; a ~15-20 minute CPU run is e.g. compare.ratios=(4,), compare.context=256,
compare.ppl_sequences=2, compare.passkey_lengths=(256,), compare.mc_tasks=('strategyqa',) (9 rows).
"""

from __future__ import annotations

import math
import time
from typing import Optional

import jax
import ml_collections
import numpy as np

from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.registry import DMC_METHODS, make_method
from dmc_jax.errors import UserError
from dmc_jax.evaluation import bigbench, compare_report
from dmc_jax.evaluation.compare_options import validate
from dmc_jax.evaluation.decode_perplexity import decode_perplexity
from dmc_jax.evaluation.passkey import run_passkey
from dmc_jax.evaluation.text_files import read_text
from dmc_jax.model.llama import unstack_layers

ADAPTIVE = ("corm",)  # methods without a budget: the rule alone sets the CR


def _rows_of(ids: np.ndarray, n: int, length: int) -> np.ndarray:
    """n rows of `length` tokens spread evenly over ids."""
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    if len(ids) < length:
        raise UserError(f"the evaluation text has {len(ids)} tokens, fewer than compare.context={length}")
    return np.stack([ids[s:s + length] for s in starts])


def _method_factory(config, name: str, ratio, dmc=None):
    """length -> cache method: budget = ceil(length / ratio) for eviction methods; dense has none; DMC caches
    (dmc, dmc_paged) are sized by the CR their model was trained for (cache.target_cr x cache.margin)."""
    def make(length: int):
        if name in DMC_METHODS:
            section = _cache_section(config, name, None)
            section.target_cr = float(dmc.target_cr)
            return make_method(section, dmc)
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


def _evaluate(config, label, params, cfg, tokenizer, method_name, ratio, wrap, data, dmc=None) -> dict:
    c = config.compare
    make = _method_factory(config, method_name, ratio, dmc)
    if wrap is not None:
        base_make = make
        make = lambda length: wrap(base_make(length))
    row = {"model": label, "method": method_name, "ratio": ratio, "key": row_key((label, method_name, ratio))}
    try:
        method = make(c.context)
    except UserError as e:
        return row | {"skipped": str(e)}
    row["budget"] = (None if ratio is None or method_name == "dense" or method_name in DMC_METHODS
                     else math.ceil(c.context / ratio))
    if row["budget"] is not None and row["budget"] < c.min_budget:
        return row | {"skipped": f"budget {row['budget']} < compare.min_budget"}
    start = time.perf_counter()
    print(f"[compare] {label} {method_name} CR {ratio}", flush=True)
    if "ppl" in c.evals:
        try:
            res = decode_perplexity(params, data["ppl_rows"], method, cfg, c.prefix, c.batch)
            row.update(ppl=res.perplexity, logical_cr=res.compression_ratio,
                       bytes_per_seq=res.bytes_allocated_per_sequence, tokens_scored=res.tokens_scored)
            print(f"  perplexity {res.perplexity:.3f}, CR {res.compression_ratio:.2f}, "
                  f"{res.bytes_allocated_per_sequence / 2**20:.2f} MB/seq ({res.seconds:.0f} s)", flush=True)
        except UserError as e:  # e.g. a DMC cache that overflowed: recorded in the row, the grid goes on
            row["ppl_skipped"] = str(e)
            print(f"  perplexity not measured: {e}", flush=True)
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
    _check_extra_models(config)  # before hours of rows, not after
    data = _data(config, tok)
    rows = Rows(config.output_dir, list(c.mc_tasks) if "mc" in c.evals else [], measure_settings(config),
                previous_rows(config) if c.resume else {})
    base = lambda name, ratio: rows.add(("base", name, ratio), lambda: _evaluate(
        config, "base", model.params, model.cfg, tok, name, ratio, None, data))
    base("dense", 1.0)
    for name in c.methods:
        if name in ADAPTIVE:  # no budget: one row at the CR the rule reaches
            base(name, None)
        elif name != "dense":
            for r in c.ratios:
                base(name, float(r))
    grams = None
    for spec in c.kv_heads:
        if rows.reuse((f"kv {spec}", "dense", None)):
            continue
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
        rows.add((f"kv {spec}", "dense", None), lambda: row)
    for spec in c.extra_models:  # e.g. DMC-retrofitted models (task retrofit writes <run>/dmc/model)
        _extra_model_rows(config, spec, model.cfg, tok, data, rows)
    out = rows.write()
    print(open(out["table"]).read())
    return {"rows": list(rows), **out}


def _check_extra_models(config) -> None:
    from dmc_jax.cache.registry import METHODS
    from dmc_jax.weights.load import resolve

    for spec in config.compare.extra_models:
        label, source, method = spec.split("|")
        if method not in (*METHODS, *DMC_METHODS):
            raise UserError(f"compare.extra_models {label!r}: cache method {method!r} is not one of "
                            f"{', '.join((*METHODS, *DMC_METHODS))}")
        if source != "tiny":
            resolve(source)


def _extra_model_rows(config, spec: str, base_cfg, tok, data, rows: "Rows") -> None:
    """Rows of compare.extra_models entry 'label|model source|cache method'. A DMC cache gives one row at the CR its
    model was trained for (dmc_config.json in the model directory); other methods one row per compare.ratios."""
    from dmc_jax.dmc.export import method_sections
    from dmc_jax.tasks.common import load_model

    label, source, method = spec.split("|")
    extra_config = ml_collections.ConfigDict(config.to_dict())
    extra_config.model.source = source
    dmc = None
    if method in DMC_METHODS:
        dmc = method_sections(extra_config)[1]  # the model directory's dmc_config.json, else the config's section
        if dmc is None:
            raise UserError(f"compare.extra_models {label!r}: {source} has no dmc_config.json and the config no dmc "
                            f"section; a DMC cache needs the hyper-parameters the model was trained with")
        ratios = (float(dmc.target_cr),)
    elif method in ("dense", *ADAPTIVE):
        ratios = (None,)  # dense: the CR of its KV heads against the base model's, set below
    else:
        ratios = tuple(float(r) for r in config.compare.ratios)
    keys = [(label, method, r) for r in ratios]
    if all(rows.reuse(k) for k in keys):
        return
    extra = load_model(extra_config, require_tokenizer=False)  # scored with the base model's tokenizer
    if extra.cfg.vocab_size != base_cfg.vocab_size:
        raise UserError(f"compare.extra_models {label!r}: {source} has a vocabulary of {extra.cfg.vocab_size} tokens, "
                        f"the base model {base_cfg.vocab_size}; compare models that share the base tokenizer")
    kv_cr = base_cfg.num_kv_heads * base_cfg.head_dim / (extra.cfg.num_kv_heads * extra.cfg.head_dim)
    for key, r in zip(keys, ratios):
        def measure():
            row = _evaluate(config, label, extra.params, extra.cfg, tok, method, r, None, data, dmc=dmc)
            if method == "dense":
                row["ratio"] = kv_cr
            return {**row, "source": source}
        rows.add(key, measure)


def row_key(key: tuple) -> str:
    """'model|method|nominal CR' (CR '-' when none: adaptive methods, KV-head conversions)."""
    label, method, ratio = key
    return f"{label}|{method}|{'-' if ratio is None else format(float(ratio), 'g')}"


ROWS_FILE = "rows.json"
# Settings that change what a row measures: a resumed run reuses rows only if these are unchanged.
MEASURE_FIELDS = ("evals", "text_files", "context", "prefix", "ppl_sequences", "passkey_lengths", "passkey_depths",
                  "passkey_trials", "mc_tasks", "mc_items", "mc_context", "min_budget")


def measure_settings(config) -> dict:
    """Everything that changes what a row measures (JSON-normalised)."""
    import json

    want = {"compare": {k: config.compare[k] for k in MEASURE_FIELDS}, "cache": config.cache.to_dict(),
            "kv_heads": config.kv_heads.to_dict(), "model": config.model.to_dict(), "seed": config.seed}
    return json.loads(json.dumps(want, default=list))


def previous_rows(config) -> dict:
    """{row key: row} of <output_dir>/rows.json (written after every row) when it was measured with the same
    settings, else {}."""
    import json
    import os

    path = os.path.join(config.output_dir, ROWS_FILE)
    if not os.path.exists(path):
        return {}
    try:
        old = json.load(open(path))
    except (OSError, json.JSONDecodeError):
        print(f"[compare] {path} is unreadable; measuring every row again (it will be replaced)", flush=True)
        return {}
    if old.get("settings") != measure_settings(config):
        print(f"[compare] {path} was measured with other settings; measuring every row again", flush=True)
        return {}
    return {r["key"]: r for r in old.get("rows", []) if r.get("key") and not r.get("ppl_skipped")}


class Rows(list):
    """The rows so far; the table is rewritten after each one so a long run shows partial results. With rows of an
    earlier run with the same settings (compare.resume), a row already measured is taken from there."""

    def __init__(self, out_dir: str, mc_tasks, settings: dict, previous: Optional[dict] = None):
        super().__init__()
        self.out_dir, self.mc_tasks, self.settings, self.previous = out_dir, mc_tasks, settings, previous or {}

    def write(self) -> dict:
        import json
        import os

        from dmc_jax.tasks.common import _plain

        dense_bytes = self[0].get("bytes_per_seq") if self else None
        for r in self:
            if r.get("bytes_per_seq") and dense_bytes:
                r["bytes_cr"] = dense_bytes / r["bytes_per_seq"]
        path = os.path.join(self.out_dir, ROWS_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"settings": self.settings, "rows": _plain(list(self))}, f, indent=1)
        os.replace(path + ".tmp", path)
        return compare_report.write_all(self.out_dir, list(self), self.mc_tasks)

    def reuse(self, key: tuple) -> bool:
        """Appends the earlier run's row for key, if there is one."""
        row = self.previous.get(row_key(key))
        if row is None:
            return False
        print(f"[compare] {row_key(key)}: measured in the earlier run, reused", flush=True)
        self.append(row)
        return True

    def add(self, key: tuple, measure) -> None:
        if not self.reuse(key):
            row = measure()
            row["key"] = row_key(key)
            self.append(row)

    def append(self, row) -> None:
        super().append(row)
        self.write()
