"""Task `train`: continued pretraining of config.model on config.data with the objective config.train.objective.

Prepares the corpus first if needed (idempotent), then runs dmc_jax.training.loop.train in <output_dir>:
metrics.jsonl, tensorboard/, checkpoints/. Run again with the same output_dir to resume from the last checkpoint.
With train.export_dir set, the final parameters are also written there as a Hugging Face directory (with
kv_method.json: the trained method of the objective, else the cache method), which every task loads as model.source (e.g. an up-trained GQA model).
With train.stages, one run in stages whose later steps change options (training/stages.py): <output_dir>/stage<i>.
"""

from __future__ import annotations

import os

import jax

from dmc_jax.data import pipeline
from dmc_jax.data.prepare import prepare
from dmc_jax.errors import UserError
from dmc_jax.training import distributed
from dmc_jax.training import stages as staging
from dmc_jax.training.loop import TrainData, train
from dmc_jax.training.objective import make_objective


def run(config, model) -> dict:
    tokenizer = model.tokenizer
    if tokenizer is None:
        raise UserError(f"model {model.source} has no tokenizer; training needs one to read data.source")
    if tokenizer.vocab_size > model.cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.cfg.vocab_size} "
                        f"embeddings; use the model's own tokenizer")
    if config.data.seq_len > model.cfg.max_seq_len:
        raise UserError(f"data.seq_len={config.data.seq_len} exceeds the model's context length "
                        f"{model.cfg.max_seq_len}; lower data.seq_len")
    stages = staging.parse(config)
    if stages:
        return _run_stages(config, model, stages)
    model = prepared(config, model)
    objective = make_objective(config.train.objective, config, model.cfg)  # bad objective options fail first
    if jax.process_index() == 0:  # one process prepares the corpus (idempotent); the others wait for it
        prepare(config.data, tokenizer)
    distributed.barrier("prepare-data")  # coordination service: process 0 may take minutes here
    eval_data = None
    if config.train.eval_every:
        eval_dataset = pipeline.make_eval_dataset(config.data, tokenizer)  # fails now, not mid-run, if missing
        eval_data = lambda: iter(eval_dataset)
    data = TrainData(train=pipeline.make_iterator(config.data, tokenizer), eval=eval_data)
    export_dir = config.train.get("export_dir", "")
    if export_dir and jax.process_count() > 1:
        raise UserError("train.export_dir gathers the weights in one process; run without it on several processes "
                        "(the orbax checkpoint holds the result)")
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), model.params)
    summary = train(config, model, objective, data)  # consumes model.params
    if export_dir:
        params = final_params(config, model.cfg, shapes, objective, summary)
        summary["export_dir"] = export(config, model, jax.device_get(params), export_dir)
        print(f"final parameters written to {summary['export_dir']}")
    return summary


def _run_stages(config, model, stages) -> dict:
    """Each stage in turn (training/stages.py); a stage whose checkpoints already reach its last step is skipped
    (but the last, which exports). Returns the last stage's summary with 'stages': [{run_dir, first_step,
    done_earlier}] of each stage."""
    import copy

    import numpy as np

    from dmc_jax.training.checkpoint import Checkpointer

    host_params = jax.tree.map(np.array, model.params)  # every stage starts from a fresh copy (a run consumes it)
    runs, summary = [], None
    for i, stage in enumerate(stages):
        sub = staging.stage_config(config, stages, i)
        first = stages[i - 1].until if i else 0
        ckpt_dir = os.path.join(sub.output_dir, "checkpoints")
        done = False
        if i < len(stages) - 1 and os.path.isdir(ckpt_dir):
            with Checkpointer(ckpt_dir, read_only=True) as ck:
                done = stage.until in ck.all_steps()
        if done:
            print(f"stage {i} (steps {first + 1}..{stage.until}): done earlier, in {sub.output_dir}", flush=True)
            runs.append({"run_dir": sub.output_dir, "first_step": first, "done_earlier": True})
            continue
        changes = " ".join(f"{k}={v!r}" for s in stages[:i + 1] for k, v in s.overrides) or "the config as it is"
        print(f"stage {i} (steps {first + 1}..{stage.until}): {changes}; in {sub.output_dir}", flush=True)
        stage_model = copy.copy(model)
        stage_model.params = jax.tree.map(np.array, host_params)
        summary = run(sub, stage_model)
        runs.append({"run_dir": sub.output_dir, "first_step": first, "done_earlier": False})
    return dict(summary, stages=runs)


def prepared(config, model):
    """The model with the parameters its trained method adds (TrainedMethod.prepare_model), else as it is;
    idempotent."""
    import dataclasses

    from dmc_jax.cache import registry

    trained = registry.trained(config.train.objective)
    if trained is None or not trained.prepare_model:
        return model
    cfg, params = registry.load_factory(trained.prepare_model)(config, model.cfg, model.params)
    return dataclasses.replace(model, cfg=cfg, params=params)


def final_params(config, cfg, shapes, objective, summary):
    """The parameters of the run's last checkpoint (where loop.train leaves the result)."""
    from dmc_jax.training import loop
    from dmc_jax.training.checkpoint import Checkpointer

    s = loop.setup(config, cfg, shapes, objective)
    with Checkpointer(summary["checkpoint_dir"], config.checkpoint.max_to_keep, False) as ck:
        state = ck.restore_state(summary["last_checkpoint"], s.abstract_state(shapes))
    return state["params"]


def export(config, model, host_params, path: str) -> str:
    """A Hugging Face directory of host_params with the model's tokenizer and its kv_method.json: the trained
    method's (objective = a trained section, e.g. 'dmc') or the method the run's cache section names."""
    from dmc_jax.cache import model_method, registry

    trained = registry.trained(config.train.objective)
    if trained is not None:
        return model_method.save(path, model.cfg, host_params, model.tokenizer, trained.serve_method,
                                 config[trained.section], config.get("cache"))
    resolved = model_method.resolve(config)
    return model_method.save(path, model.cfg, host_params, model.tokenizer, resolved.name, resolved.hparams,
                             config.get("cache"))
