"""Task `train`: continued pretraining of config.model on config.data with the objective config.train.objective.

Prepares the corpus first if needed (idempotent), then runs dmc_jax.training.loop.train in <output_dir>:
metrics.jsonl, tensorboard/, checkpoints/. Run again with the same output_dir to resume from the last checkpoint.
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils

from dmc_jax.data import pipeline
from dmc_jax.data.prepare import prepare
from dmc_jax.errors import UserError
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
    if jax.process_index() == 0:  # one process prepares the corpus (idempotent); the others wait for it
        prepare(config.data, tokenizer)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("dmc_jax prepare_data")
    objective = make_objective(config.train.objective, config, model.cfg)
    eval_data = None
    if config.train.eval_every:
        eval_dataset = pipeline.make_eval_dataset(config.data, tokenizer)  # fails now, not mid-run, if missing
        eval_data = lambda: iter(eval_dataset)
    data = TrainData(train=pipeline.make_iterator(config.data, tokenizer), eval=eval_data)
    return train(config, model, objective, data)
