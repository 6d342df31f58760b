"""Continued pretraining, method-agnostic: the loop minimizes an Objective and knows no compression method.

    objective.py    the Objective interface (loss(params, batch, rng, step) -> (loss, metrics)), the LM objective,
                    and the registry of train.objective names
    optimizer.py    AdamW with a decay mask, warmup + constant / cosine / linear LR schedules, global-norm clipping,
                    frozen weight groups (optim.freeze)
    step.py         one update (gradient accumulation over micro-batches in fp32) and one evaluation batch
    sharding.py     the (data, fsdp, tensor) mesh and logical-axis rules -> shardings
    checkpoint.py   orbax checkpoints: params, optimizer state, RNG key, data iterator position; async, atomic,
                    checksummed (checksums.py), the newest intact one restored
    metrics_log.py  metrics.jsonl and TensorBoard event files
    progress.py     the logging window: per-step host metrics checked (NaN guard) and averaged into log rows
    loop.py         train(config, model, objective, data) = Trainer: jit, shardings, donation, resume, logging,
                    saving, evaluation
    stages.py       train.stages: one run whose later steps change options (each stage a run of its own, resumable)

Shape letters: B batch rows, T time, V vocab.
"""
