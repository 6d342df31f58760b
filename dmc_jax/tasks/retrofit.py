"""Task `retrofit` (the README's main job): train a model for a trained cache method, a control, and their report.

retrofit.method names any cache method whose registry entry is trained (DMC: 'dmc'); its trained section (config.dmc)
is the training objective and the hyper-parameters saved with the model.
    1. perplexity of the original model on held-out text (never trained on)
    2. the retrofit (train.objective = the trained section, e.g. DMC's zero-out stage, CR ramp, fine-tune) -> <run>/<section>
    3. the control, when the method has one (its section's `control` field: DMC's vanilla control, the same recipe
       and tokens with every decision 'append')                                                  -> <run>/control
    4. held-out perplexity and achieved compression (hard decisions, exactly what the cache keeps) of both, a
       generation through the method's real cache with its bytes, report.md, cr_heatmap.png, results.json
    5. the model as a Hugging Face directory with its kv_method.json                            -> <run>/<section>/model
       (serve or evaluate it: model.source=<run>/dmc/model brings its method; task compare's extra_models)
    6. side by side (retrofit.side_by_side, default H2O and TOVA): the trained model through its serving cache and
       each eviction method at the CR the trained model reached, decoded through the caches (task compare's
       protocol) on the same held-out text                                                    -> <run>/side_by_side

Each training run resumes from its checkpoints when the task is run again with the same output_dir.
"""

from __future__ import annotations

import copy
import os
import time

import jax
import ml_collections
import numpy as np

from dmc_jax.cache import model_method, registry
from dmc_jax.cache.protocol import state_bytes
from dmc_jax.cache.dense import DenseCache
from dmc_jax.errors import UserError
from dmc_jax.evaluation.perplexity import perplexity
from dmc_jax.evaluation.text_files import read_text, token_rows
from dmc_jax.evaluation.report import cr_heatmap, markdown_table
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.model import llama
from dmc_jax.evaluation.side_by_side_options import DEFAULT_METHODS
from dmc_jax.tasks import side_by_side, train as train_task
from dmc_jax.tasks.evaluate import default_text_files
from dmc_jax.training.objective import make_objective


def method_of(config: ml_collections.ConfigDict) -> registry.MethodSpec:
    """The cache method the retrofit trains (retrofit.method, default 'dmc')."""
    return registry.get(config.retrofit.get("method", "dmc"))


def _subrun(config: ml_collections.ConfigDict, name: str, control: bool) -> ml_collections.ConfigDict:
    section = method_of(config).trained.section
    sub = copy.deepcopy(config)
    with sub.unlocked():
        sub.output_dir = os.path.join(config.output_dir, name)
        sub.checkpoint.dir = ""
        if "control" in sub[section]:
            sub[section].control = control
        sub.train.objective = section
    return sub


def _train(sub, model, host_params):
    """Trains a fresh copy of the original params; returns (final params, training summary)."""
    run_model = copy.copy(model)
    run_model.params = jax.tree.map(np.array, host_params)
    run_model = train_task.prepared(sub, run_model)  # e.g. a fresh DMS adapter: what the checkpoints hold
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), run_model.params)
    start = time.perf_counter()
    summary = train_task.run(sub, run_model)
    summary["wall_seconds_this_call"] = time.perf_counter() - start
    summary["training_seconds"] = sum(_training_seconds(r["run_dir"], r["first_step"])
                                      for r in summary.get("stages", [{"run_dir": summary["run_dir"], "first_step": 0}]))
    params = train_task.final_params(sub, run_model.cfg, shapes,
                                     make_objective(sub.train.objective, sub, run_model.cfg), summary)
    return params, summary


def _training_seconds(run_dir: str, first_step: int = 0) -> float:
    """Seconds spent in training steps according to the run's metrics.jsonl (across resumes; no compile time in
    a resumed run's first step is excluded, logging and checkpointing are); first_step: the step the run (a stage)
    started after."""
    import json

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"step_time_s"' in line]
    total, last = 0.0, first_step
    for row in rows:
        total += row["step_time_s"] * (row["step"] - last)
        last = row["step"]
    return total


def _heldout_ids(config, tokenizer) -> tuple[list, list]:
    e = config.eval
    files = [f.strip() for f in e.text_files.split(",") if f.strip()] or default_text_files()
    ids = []
    for path in files:
        ids.extend(tokenizer.encode(read_text(path)))
        if e.max_tokens and len(ids) >= e.max_tokens:
            break
    return (ids[:e.max_tokens] if e.max_tokens else ids), files


def _evaluate(params, ids, model, config, attention) -> dict:
    e = config.eval
    start = time.perf_counter()
    # weights cast once to the compute dtype (bit-identical; no fp32 -> bf16 convert of every weight per window)
    res = perplexity(llama.compute_dtype_weights(llama.unstack_layers(params), model.cfg), ids, model.cfg,
                     window=e.window, stride=e.stride, batch=e.batch, decode=model.tokenizer.decode,
                     attention=attention)
    return res.to_dict() | {"seconds": time.perf_counter() - start}


# The generation sample's cache: the config's serving cache (cache.method = the method or its serving method, e.g.
# dms_paged), else the method's own cache sized for the target CR with extra head room, merging rather than failing
# when a head runs out of room (a model that has not reached its target would otherwise end the job after training).
SAMPLE_SIZING = {"margin": 1.5, "on_overflow": "merge"}


def _generate_sample(params, model, config) -> dict:
    """A generation through the method's real cache, and its bytes next to the dense cache's."""
    g, tok = config.generate, model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": g.prompt}]) if g.chat else g.prompt
    prompt = tok.encode(text)
    gen = GenerateConfig(max_new_tokens=g.max_new_tokens, stop_ids=tuple(tok.stop_ids))
    spec = method_of(config)
    hparams = config[spec.trained.section]
    cache = config.get("cache") or ml_collections.ConfigDict()
    if cache.get("method") in (spec.name, spec.trained.serve_method, spec.trained.engine_method):  # the config's
        name, overrides = cache.method, {}                                                      # serving cache
    else:
        name, own = spec.name, registry.method_section(cache, spec.name)
        overrides = {k: v for k, v in {**SAMPLE_SIZING, "target_cr": float(hparams.get("target_cr", 0.0))}.items()
                     if k in own}
    method = registry.build(name, cache, hparams, **overrides)
    out = generate(llama.layers_for(params, method, otherwise=llama.unstack_layers), [prompt], model.cfg, method,
                   gen, jax.random.PRNGKey(0))
    stats = method.stats(out.state, out.lengths)
    seen = int(out.lengths[0])
    kept = np.asarray(stats["kept_LBK"]).astype(float)
    dense_bytes = state_bytes(DenseCache().init(model.cfg, 1, len(prompt) + g.max_new_tokens))
    return {"prompt": g.prompt, "completion": tok.decode(out.tokens[0]), "tokens_seen": seen,
            "slots_kept_mean": float(kept.mean()), "cache_cr": seen / float(kept.mean()),
            "cache_bytes_allocated": int(stats["bytes_allocated"]), "dense_cache_bytes_allocated": dense_bytes,
            "cache": name, "overflow_merges": int(np.asarray(stats.get("overflow_LBK", 0)).sum())}


def _calibration_rows(config, tokenizer) -> np.ndarray | None:
    """None unless retrofit.calibrate_threshold; else [retrofit.calibration_rows, eval.window] token rows of
    training text: retrofit.calibration_files, or ('') the training corpus's own files (data.source 'default' or a
    directory), consecutive windows from the first files; never the held-out text. Read before training, so a
    missing text is an error before any step runs."""
    r, T = config.retrofit, int(config.eval.window)
    if not r.get("calibrate_threshold", False):
        return None
    from dmc_jax.data import sources

    n = int(r.get("calibration_rows", 8))
    files = [f.strip() for f in r.get("calibration_files", "").split(",") if f.strip()]
    if not files:
        files = sorted(str(f) for f in sources.resolve(config.data, fetch=True).files)
        if not files:
            raise UserError(f"retrofit.calibrate_threshold needs text to calibrate on and data.source="
                            f"{config.data.source!r} has no local files; set retrofit.calibration_files")
    return token_rows(tokenizer, files, T, n, what="retrofit.calibration_files")


def _calibrated(config, params, model, rows):
    """(config, None) unless retrofit.calibrate_threshold; then (a copy of config whose cache.dms_paged.threshold is
    the one whose kept tokens fill the serving pool on training text, what dms/calibrate.py found). The pool is the
    one the side by side serves eval.window tokens from: its slots per head of one sequence, less half a page (the
    average rounding of a head's last page)."""
    if rows is None:
        return config, None
    from dmc_jax.dms import calibrate
    from dmc_jax.dms.config import from_section

    start = time.perf_counter()
    T = int(config.eval.window)
    method = registry.build("dms_paged", config.cache, config.dms)
    cfg = model.cfg
    slots = method.pool_pages(cfg, 1, T) * method.page_size / (cfg.num_layers * cfg.num_kv_heads)
    target = slots - method.page_size / 2
    found = calibrate.calibrate(params, cfg, from_section(config.dms), rows, target,
                                start=float(config.cache.dms_paged.threshold))
    config = copy.deepcopy(config)
    with config.unlocked():  # the pool's, and the model directory's own DMS cache section (kv_method.json)
        config.cache.dms_paged.threshold = found.threshold
        config.cache.dms.threshold = found.threshold
    info = found.to_dict() | {"slots_per_head": slots, "seconds": time.perf_counter() - start}
    print(f"serving threshold {found.threshold:+.3f}: {found.kept_per_head:.1f} of {T} tokens kept per head on "
          f"{found.rows} rows of training text (pool: {slots:.1f} slots per head; target {target:.1f})")
    return config, info


def _side_by_side(config, model, host_params, model_dir: str, label: str):
    """Step 6 (side_by_side.run), or None when retrofit.side_by_side is empty; a row that cannot be measured is
    recorded in its row, and an error here is reported, never losing the trained result."""
    if not tuple(config.retrofit.get("side_by_side", DEFAULT_METHODS)):
        return None
    base = copy.copy(model)
    base.params = host_params  # the original model (training worked on copies)
    try:
        return side_by_side.run(config, base, model_dir, label)
    except UserError as e:
        print(f"side by side not measured: {e}")
        return {"dir": os.path.join(config.output_dir, "side_by_side"), "rows": [], "note": f"not measured: {e}"}


def run(config: ml_collections.ConfigDict, model) -> dict:
    host_params = jax.device_get(model.params)  # every run starts from the original weights
    ids, files = _heldout_ids(config, model.tokenizer)
    print(f"held-out text: {len(ids)} tokens from {', '.join(os.path.basename(f) for f in files)}")
    calibration_rows = _calibration_rows(config, model.tokenizer)
    spec = method_of(config)
    trained = spec.trained
    hparams = config[trained.section]
    results = {"heldout_files": files, "heldout_tokens": len(ids), "method": spec.name,
               "target_cr": hparams.get("target_cr")}
    results["original"] = _evaluate(host_params, ids, model, config, llama.causal_attention)
    print(f"original: perplexity {results['original']['perplexity']:.3f}")
    has_control = "control" in hparams and config.retrofit.control
    results["trained_run"] = trained.section  # the run's name: <run>/dmc for DMC
    runs = [(trained.section, False)] + ([("control", True)] if has_control else [])
    evaluate_with = registry.load_factory(trained.evaluate)
    # Hard decisions: exactly what the cache keeps. The control is evaluated as it was trained (DMC: vanilla
    # attention with the decision channel faded to 0; its unused W_q/W_k columns may have drifted after the surgery).
    hard, control_attention = evaluate_with(hparams, False), (evaluate_with(hparams, True) if has_control else None)
    for name, control in runs:
        sub = _subrun(config, name, control)
        params, summary = _train(sub, model, host_params)
        row = _evaluate(params, ids, model, config, control_attention if control else hard)
        row.update(train=summary, tokens_trained=config.train.steps * config.data.batch_size * config.data.seq_len)
        if not control:  # the model first: a failed sample below must not cost the trained result
            config, row["calibration"] = _calibrated(config, params, model, calibration_rows)
            cfg = model.cfg.replace(dms_adapter="dms_adapter" in params["layers"])  # a DMS adapter it trained
            row["model_dir"] = model_method.save(os.path.join(sub.output_dir, "model"), cfg,
                                                 jax.device_get(params), model.tokenizer, trained.serve_method,
                                                 sub[trained.section], config.get("cache"))
            print(f"{name}: model written to {row['model_dir']}")
            try:
                row["generation"] = _generate_sample(params, model, config)
            except UserError as e:  # e.g. a model far from its target CR overflows the sample's cache
                row["generation_error"] = str(e)
                print(f"{name}: no generation sample: {e}")
        results[name] = row
        print(f"{name}: perplexity {row['perplexity']:.3f}, compression ratio {row['compression_ratio']:.2f} "
              f"({summary['training_seconds']:.0f} s of training steps)")
    if "model_dir" in results[trained.section]:
        results["side_by_side"] = _side_by_side(config, model, host_params, results[trained.section]["model_dir"],
                                                trained.section)
    out_dir = config.output_dir
    results["cr_heatmap"] = cr_heatmap(np.asarray(results[trained.section]["compression_ratio_layer_head"]),
                                       os.path.join(out_dir, "cr_heatmap.png"),
                                       f"{spec.name} retrofit, target CR {results['target_cr']}: held-out CR per layer x head")
    report = markdown_table(results)
    if results.get("side_by_side"):
        report += side_by_side.markdown(results["side_by_side"])
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    print(report)
    return results
