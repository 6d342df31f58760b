"""Task `compare`: every method x compression ratio through the same decode loop and the same evaluations.

Rows: the base model with the dense cache (CR 1) and with each eviction method at each ratio (budget =
context / CR; CORM adaptive has no budget: one row at the CR its rule reaches); the base model converted to
fewer KV heads (compare.kv_heads, with the dense cache); and compare.extra_models 'label|source|cache method':
other models with a cache method, e.g. 'dmc|runs/r/dmc/model|dmc_paged' (task retrofit writes that directory
with its kv_method.json: one row at the CR the model was trained for, the pool sized by it) or an up-trained
GQA model 'gqa|runs/g/uptrained|dense' (task train with train.export_dir). For each row:
    (a) perplexity of held-out text DECODED through the cache (dmc_jax.evaluation.decode_perplexity)
    (b) passkey retrieval by context length x depth (budget = length / CR)
    (c) multiple-choice accuracy on local BIG-bench tasks (budget = mc_context / CR)
    (d) cache bytes allocated per sequence (at compare.context tokens) and the bytes CR vs the dense cache
Writes compare.md (every row, then a method x CR summary and the winner at each CR), ppl_vs_cr.png, passkey.png
and rows.json (after every row) in the run directory; results.json holds every row at the end. Running again with
the same output_dir reuses the rows measured with the same settings (compare.resume): an interrupted grid goes
on where it stopped, and a grid can grow by methods, ratios or models (rows of the earlier run that the new grid
does not name are kept in rows.json and the tables; results.json: kept_rows).

Cost (SmolLM2-135M, fp32, 2-core CPU): compilation dominates. Each row compiles one decode scan per shape
(perplexity, each passkey length, multiple choice), 30-90 s each, and decodes at ~50 tokens/s at batch 4
(measured with other jobs sharing the cores, so upper bounds). The defaults (22 rows x 4 compilations) are
for a quiet machine or a GPU; a ~15-20 minute CPU run is e.g. compare.ratios=(4,), compare.context=256,
compare.ppl_sequences=2, compare.passkey_lengths=(256,), compare.mc_tasks=('strategyqa',) (9 rows).
"""

from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np

from dmc_jax.cache import model_method, registry
from dmc_jax.errors import UserError
from dmc_jax.evaluation import bigbench, compare_grid
from dmc_jax.evaluation.compare_options import validate
from dmc_jax.evaluation.compare_rows import Rows, measure_settings, previous_rows, row_key, source_fingerprint
from dmc_jax.evaluation.decode_perplexity import decode_perplexity
from dmc_jax.evaluation.passkey import run_passkey
from dmc_jax.evaluation.text_files import read_text
from dmc_jax.model.llama import compute_dtype_weights, layers_for, unstack_layers


def _rows_of(ids: np.ndarray, n: int, length: int) -> np.ndarray:
    """n rows of `length` tokens spread evenly over ids."""
    starts = np.linspace(0, len(ids) - length, n).astype(int)
    if len(ids) < length:
        raise UserError(f"the evaluation text has {len(ids)} tokens, fewer than compare.context={length}")
    return np.stack([ids[s:s + length] for s in starts])


def _evaluate(config, label, params, cfg, tokenizer, method_name, ratio, wrap, data, hparams=None) -> dict:
    c = config.compare
    make = compare_grid.method_factory(config.cache, method_name, ratio, hparams)
    if wrap is not None:
        base_make = make
        make = lambda length: wrap(base_make(length))
    row = {"model": label, "method": method_name, "ratio": ratio, "key": row_key((label, method_name, ratio))}
    try:
        method = make(c.context)
    except UserError as e:
        return row | {"skipped": str(e)}
    params = layers_for(params, method)  # stacked (scanned) for a method that asks, else as given
    params = compute_dtype_weights(params, cfg)  # cast once, not per token (identical numbers)
    row["budget"] = compare_grid.budget(method_name, ratio, c.context)
    if row["budget"] is not None and row["budget"] < c.min_budget:
        return row | {"skipped": f"budget {row['budget']} < compare.min_budget"}
    start = time.perf_counter()
    print(f"[compare] {label} {method_name} CR {ratio}", flush=True)
    if "ppl" in c.evals:
        try:
            res = decode_perplexity(params, data["ppl_rows"], method, cfg, c.prefix, c.batch, c.decode_order)
            row.update(decode_order=res.order, ppl=res.perplexity, logical_cr=res.compression_ratio,
                       bytes_per_seq=res.bytes_allocated_per_sequence, tokens_scored=res.tokens_scored,
                       overflow=res.overflow)
            spill = f", {res.overflow} tokens forced out by a full buffer (on_overflow='evict')" if res.overflow else ""
            print(f"  perplexity {res.perplexity:.3f}, CR {res.compression_ratio:.2f}, "
                  f"{res.bytes_allocated_per_sequence / 2**20:.2f} MB/seq{spill} ({res.seconds:.0f} s)", flush=True)
        except UserError as e:  # e.g. a DMC cache that overflowed: recorded in the row, the grid goes on
            row["ppl_skipped"] = str(e)
            print(f"  perplexity not measured: {e}", flush=True)
    if "passkey" in c.evals:
        try:
            cells = run_passkey(params, cfg, tokenizer, data["filler"], make, c.passkey_lengths, c.passkey_depths,
                                c.passkey_trials, seed=config.seed, batch=2 * c.batch)
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


def passkey_filler(tokenizer) -> np.ndarray:
    """The passkey prompts' filler: token ids of the default corpus's first training work."""
    from dmc_jax.kv_heads.convert import default_calibration_files

    return np.asarray(tokenizer.encode(read_text(default_calibration_files()[0])), np.int32)


def _data(config, tokenizer) -> dict:
    from dmc_jax.data import default_corpus

    c = config.compare
    files = [f.strip() for f in c.text_files.split(",") if f.strip()] or default_corpus.heldout_files()
    ids = np.concatenate([np.asarray(tokenizer.encode(read_text(f)), np.int32) for f in files])
    filler = passkey_filler(tokenizer)
    mc = {}
    if "mc" in c.evals and c.mc_tasks:
        paths = bigbench.ensure_tasks(c.mc_cache_dir, c.mc_tasks)
        mc = {t: bigbench.build_items(tokenizer, bigbench.load_examples(p), c.mc_items, c.mc_context, config.seed)
              for t, p in paths.items()}
    return {"ppl_rows": _rows_of(ids, c.ppl_sequences, c.context), "filler": filler, "mc": mc}


def run(config: ml_collections.ConfigDict, model) -> dict:
    from dmc_jax.kv_heads import convert as kvc

    c = config.compare
    validate(c)
    tok = model.tokenizer
    if tok is None:
        raise UserError(f"model {model.source} has no tokenizer; compare needs one")
    _check_extra_models(config)  # before hours of rows, not after
    data = _data(config, tok)
    rows = Rows(config.output_dir, list(c.mc_tasks) if "mc" in c.evals else [], measure_settings(config),
                previous_rows(config) if c.resume else {}, cache_section=lambda m: _cache_section(config, m))
    for row in compare_grid.base_rows(c.methods, c.ratios):
        hparams = _config_hparams(config, row.method)
        rows.add(row.key, lambda row=row, hparams=hparams: _evaluate(
            config, "base", model.params, model.cfg, tok, row.method, row.ratio, None, data, hparams))
    grams = None
    for spec in c.kv_heads:
        if rows.reuse((f"kv {spec}", "dense", None)):
            continue
        kv_method, rope = spec.split(":")
        if kv_method == "svd_a" and grams is None:
            grams = kvc.calibrate(config.kv_heads, model.params, model.cfg, tok)
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
    return {"rows": list(rows), "kept_rows": rows.kept(), **out}  # kept_rows: the earlier run's, not in this grid


def _cache_section(config, method: str) -> dict:
    """The cache fields a row of `method` depends on (its own section), JSON-normalised."""
    return json.loads(json.dumps(registry.method_section(config.cache, method).to_dict(), default=list))


def _config_hparams(config, method: str):
    """A trained method's hyper-parameters from the config's section (None: training-free, or the defaults)."""
    spec = registry.get(method)
    return config.get(spec.trained.section) if spec.trained is not None else None


def _check_extra_models(config) -> None:
    from dmc_jax.weights.load import resolve

    for spec in config.compare.extra_models:
        label, source, method = spec.split("|")
        if method not in (registry.AUTO, *registry.names()):
            raise UserError(f"compare.extra_models {label!r}: cache method {method!r} is not one of "
                            f"{', '.join((registry.AUTO, *registry.names()))}")
        if source != "tiny":
            resolve(source)


def _extra_model_rows(config, spec: str, base_cfg, tok, data, rows: Rows) -> None:
    """Rows of compare.extra_models entry 'label|model source|cache method' ('auto': the directory's own method). A trained
    method (DMC) gives one row at
    the CR its model was trained for (the model directory's kv_method.json); other methods follow compare_grid."""
    from dmc_jax.tasks.common import load_model

    label, source, method = spec.split("|")
    extra_config = ml_collections.ConfigDict(config.to_dict())
    extra_config.model.source = source
    resolved = model_method.resolve(extra_config, method)  # 'auto': the model directory's own method
    method = resolved.name
    trained = registry.get(method).trained
    if trained is not None and resolved.hparams is None:
        raise UserError(f"compare.extra_models {label!r}: {source} has no kv_method.json and the config no "
                        f"'{trained.section}' section; a {method} cache needs the hyper-parameters the model was "
                        f"trained with")
    trained_cr = resolved.hparams.get("target_cr") if trained is not None else None
    grid = compare_grid.extra_rows(label, method, config.compare.ratios, trained_cr)
    fingerprint = source_fingerprint(source)  # a model retrained under the same label is measured again
    if all(rows.reuse(r.key, fingerprint) for r in grid):
        return
    extra = load_model(extra_config, require_tokenizer=False)  # scored with the base model's tokenizer
    if extra.cfg.vocab_size != base_cfg.vocab_size:
        raise UserError(f"compare.extra_models {label!r}: {source} has a vocabulary of {extra.cfg.vocab_size} tokens, "
                        f"the base model {base_cfg.vocab_size}; compare models that share the base tokenizer")
    kv_cr = base_cfg.num_kv_heads * base_cfg.head_dim / (extra.cfg.num_kv_heads * extra.cfg.head_dim)
    for r in grid:
        def measure(r=r):
            row = _evaluate(config, label, extra.params, extra.cfg, tok, method, r.ratio, resolved.wrap, data,
                            resolved.hparams)  # wrap: a DMC/DMS model under another method, its channel zeroed
            if method == "dense":
                row["ratio"] = kv_cr
            return {**row, "source": source}
        rows.add(r.key, measure, fingerprint)
