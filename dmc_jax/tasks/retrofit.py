"""Task `retrofit` (the README's main job): DMC continued pretraining, the vanilla control, and their report.

    1. perplexity of the original model on held-out text (never trained on)
    2. DMC retrofit (train.objective 'dmc': zero-out stage, CR ramp, fine-tune)   -> <run>/dmc
    3. the vanilla control: the same recipe and tokens with every decision 'append' -> <run>/control
    4. held-out perplexity and achieved compression (hard decisions, exactly what the DMC cache keeps) of both,
       a generation through the real DMC cache with its bytes, report.md, cr_heatmap.png, results.json
    5. the DMC model as a Hugging Face directory with its dmc_config.json                -> <run>/dmc/model
       (serve or evaluate it: model.source=<run>/dmc/model cache.method=dmc_paged; task compare's extra_models)

Each training run resumes from its checkpoints when the task is run again with the same output_dir.
"""

from __future__ import annotations

import copy
import os
import time

import jax
import ml_collections
import numpy as np

from dmc_jax.cache.dmc_padded import DMCPaddedCache
from dmc_jax.cache.protocol import state_bytes
from dmc_jax.cache.dense import DenseCache
from dmc_jax.dmc import export as dmc_export
from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.dmc.objective import dmc_config
from dmc_jax.dmc.surgery import FadedChannelAttention
from dmc_jax.errors import UserError
from dmc_jax.evaluation.perplexity import perplexity
from dmc_jax.evaluation.text_files import read_text
from dmc_jax.evaluation.report import cr_heatmap, markdown_table
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.model import llama
from dmc_jax.tasks import train as train_task
from dmc_jax.tasks.evaluate import default_text_files
from dmc_jax.training.objective import make_objective


def _subrun(config: ml_collections.ConfigDict, name: str, control: bool) -> ml_collections.ConfigDict:
    sub = copy.deepcopy(config)
    with sub.unlocked():
        sub.output_dir = os.path.join(config.output_dir, name)
        sub.checkpoint.dir = ""
        sub.dmc.control = control
        sub.train.objective = "dmc"
    return sub


def _train(sub, model, host_params):
    """Trains a fresh copy of the original params; returns (final params, training summary)."""
    run_model = copy.copy(model)
    run_model.params = jax.tree.map(np.array, host_params)
    start = time.perf_counter()
    summary = train_task.run(sub, run_model)
    summary["wall_seconds_this_call"] = time.perf_counter() - start
    summary["training_seconds"] = _training_seconds(summary["run_dir"])
    params = train_task.final_params(sub, model.cfg, host_params, make_objective("dmc", sub, model.cfg), summary)
    return params, summary


def _training_seconds(run_dir: str) -> float:
    """Seconds spent in training steps according to the run's metrics.jsonl (across resumes; no compile time in
    a resumed run's first step is excluded, logging and checkpointing are)."""
    import json

    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if '"step_time_s"' in line]
    total, last = 0.0, 0
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
    res = perplexity(llama.unstack_layers(params), ids, model.cfg, window=e.window, stride=e.stride, batch=e.batch,
                     decode=model.tokenizer.decode, attention=attention)
    return res.to_dict() | {"seconds": time.perf_counter() - start}


def _generate_sample(params, model, config) -> dict:
    """A generation through the real padded DMC cache, and its bytes next to the dense cache's."""
    g, tok = config.generate, model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": g.prompt}]) if g.chat else g.prompt
    prompt = tok.encode(text)
    gen = GenerateConfig(max_new_tokens=g.max_new_tokens, stop_ids=tuple(tok.stop_ids))
    method = DMCPaddedCache(dmc_config(config.dmc), target_cr=config.dmc.target_cr, margin=1.5, on_overflow="merge")
    out = generate(llama.unstack_layers(params), [prompt], model.cfg, method, gen, jax.random.PRNGKey(0))
    seen = int(out.lengths[0])
    kept = np.asarray(out.state["count"]).astype(float)
    dense_bytes = state_bytes(DenseCache().init(model.cfg, 1, len(prompt) + g.max_new_tokens))
    return {"prompt": g.prompt, "completion": tok.decode(out.tokens[0]), "tokens_seen": seen,
            "slots_kept_mean": float(kept.mean()), "cache_cr": seen / float(kept.mean()),
            "cache_bytes_allocated": state_bytes(out.state), "dense_cache_bytes_allocated": dense_bytes,
            "overflow_merges": int(np.asarray(out.state["overflow"]).sum())}


def run(config: ml_collections.ConfigDict, model) -> dict:
    host_params = jax.device_get(model.params)  # every run starts from the original weights
    ids, files = _heldout_ids(config, model.tokenizer)
    print(f"held-out text: {len(ids)} tokens from {', '.join(os.path.basename(f) for f in files)}")
    results = {"heldout_files": files, "heldout_tokens": len(ids), "target_cr": config.dmc.target_cr}
    results["original"] = _evaluate(host_params, ids, model, config, llama.causal_attention)
    print(f"original: perplexity {results['original']['perplexity']:.3f}")
    runs = [("dmc", False)] + ([("control", True)] if config.retrofit.control else [])
    hard = DMCAttention(dmc_config(config.dmc).replace(mode="hard"))
    # The control is evaluated as it was trained: vanilla attention with the decision channel faded to 0 (its W_q/W_k
    # columns are not used by the control and may have drifted after the surgery).
    control_attention = FadedChannelAttention(dmc_config(config.dmc), 0.0)
    for name, control in runs:
        sub = _subrun(config, name, control)
        params, summary = _train(sub, model, host_params)
        row = _evaluate(params, ids, model, config, control_attention if control else hard)
        row.update(train=summary, tokens_trained=config.train.steps * config.data.batch_size * config.data.seq_len)
        if not control:  # the model first: a failed sample below must not cost the trained result
            row["model_dir"] = dmc_export.save(os.path.join(sub.output_dir, "model"), model.cfg,
                                               jax.device_get(params), model.tokenizer, sub.dmc)
            print(f"{name}: model written to {row['model_dir']}")
            try:
                row["generation"] = _generate_sample(params, model, config)
            except UserError as e:  # e.g. a model far from its target CR overflows the sample's cache
                row["generation_error"] = str(e)
                print(f"{name}: no generation sample: {e}")
        results[name] = row
        print(f"{name}: perplexity {row['perplexity']:.3f}, compression ratio {row['compression_ratio']:.2f} "
              f"({summary['training_seconds']:.0f} s of training steps)")
    out_dir = config.output_dir
    results["cr_heatmap"] = cr_heatmap(np.asarray(results["dmc"]["compression_ratio_layer_head"]),
                                       os.path.join(out_dir, "cr_heatmap.png"),
                                       f"DMC retrofit, target CR {config.dmc.target_cr}: held-out CR per layer x head")
    report = markdown_table(results)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(report)
    print(report)
    return results
