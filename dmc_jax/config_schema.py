"""Validates a run config once, at start: every bad field is a UserError naming the field and what is allowed."""

from __future__ import annotations

import ml_collections

from dmc_jax.errors import UserError
from dmc_jax.model.config import DTYPES
from dmc_jax.training.optimizer import FREEZE_GROUPS

TASKS = ("demo", "generate", "eval", "bench", "prepare_data", "train", "retrofit", "plan", "convert_kv_heads",
         "compare", "methods", "convert_megatron", "serve")


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise UserError(f"{name} must be one of {', '.join(map(str, allowed))}; got {value!r}")


def _at_least(name: str, value, low) -> None:
    if value < low:
        raise UserError(f"{name} must be >= {low}; got {value!r}")


def _sections(config: ml_collections.ConfigDict, needed) -> None:
    for section in needed:
        if section not in config:
            raise UserError(f"the config has no '{section}' section, which task {config.task!r} needs; "
                            f"start from configs/smollm2.py")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises UserError for the first field out of range."""
    if "task" not in config:
        raise UserError("the config has no 'task' field; start from configs/smollm2.py")
    _one_of("task", config.task, TASKS)
    _bool("keep_freed_memory", config.get("keep_freed_memory", False))
    _sections(config, ("model",))
    m = config.model
    _one_of("model.param_dtype", m.param_dtype, sorted(DTYPES))
    _one_of("model.compute_dtype", m.compute_dtype, sorted(DTYPES))
    _at_least("model.max_seq_len", m.max_seq_len, 0)
    if m.get("remat_policy"):
        from dmc_jax.model.remat import POLICIES
        _one_of("model.remat_policy", m.remat_policy, POLICIES)
    if not m.source:
        raise UserError("model.source is empty; use 'smollm2', a .gguf file or a Hugging Face model directory")
    if "cache" in config:
        from dmc_jax.cache import model_method  # the registry knows the methods; each checks its own fields
        model_method.make(config)
    if config.task in ("generate", "demo", "retrofit"):
        _sections(config, ("generate",) if config.task == "retrofit" else ("generate", "cache"))
        g = config.generate
        _at_least("generate.max_new_tokens", g.max_new_tokens, 1)
        _at_least("generate.temperature", g.temperature, 0.0)
        _at_least("generate.top_k", g.top_k, 0)
        if not 0.0 < g.top_p <= 1.0:
            raise UserError(f"generate.top_p must be in (0, 1] (1 = off); got {g.top_p}")
    if config.task in ("eval", "demo", "retrofit"):
        _sections(config, ("eval",))
        e = config.eval
        _at_least("eval.window", e.window, 2)
        if not 1 <= e.stride <= e.window:
            raise UserError(f"eval.stride must be in [1, eval.window={e.window}]; got {e.stride}")
        _at_least("eval.max_tokens", e.max_tokens, 0)
        _at_least("eval.batch", e.batch, 1)
        if m.max_seq_len and e.window > m.max_seq_len:
            raise UserError(f"eval.window={e.window} exceeds model.max_seq_len={m.max_seq_len}; lower eval.window "
                            f"or raise model.max_seq_len")
    if config.task == "bench":
        _sections(config, ("bench",))
        b = config.bench
        _at_least("bench.prefill_len", b.prefill_len, 1)
        _at_least("bench.decode_tokens", b.decode_tokens, 2)
        _at_least("bench.repeats", b.repeats, 1)
        if not b.batch_sizes or any(not isinstance(x, int) or x < 1 for x in b.batch_sizes):
            raise UserError(f"bench.batch_sizes must be a non-empty tuple of positive ints; got {b.batch_sizes}")
    if config.task in ("convert_kv_heads", "compare"):
        _sections(config, ("kv_heads",) + (("compare", "cache") if config.task == "compare" else ()))
        from dmc_jax.kv_heads.options import validate as validate_kv_heads  # each section validates itself
        validate_kv_heads(config.kv_heads)
        if config.task == "compare":
            from dmc_jax.evaluation.compare_options import validate as validate_compare
            validate_compare(config.compare)
    if config.task == "convert_megatron":
        _sections(config, ("convert",))
        from dmc_jax.weights.convert_options import validate as validate_convert  # the section validates itself
        validate_convert(config.convert)
    if config.task == "serve":
        _sections(config, ("serve", "cache"))
        from dmc_jax.serving.options import validate as validate_serve  # the section validates itself
        validate_serve(config.serve)
    if config.task in ("train", "retrofit", "plan"):
        _sections(config, ("data", "train", "optim", "checkpoint"))
        _validate_training(config)
    if "distributed" in config:
        from dmc_jax.training.distributed import validate as validate_distributed
        validate_distributed(config)
    if config.task == "plan":
        from dmc_jax.tasks.plan import validate as validate_plan  # the plan section validates itself
        validate_plan(config)
    trained = _trained_method(config)
    if trained is not None:  # the trained section of the method this run trains validates itself
        _sections(config, (trained.section,) + (("retrofit",) if config.task == "retrofit" else ()))
        trained.validate(config[trained.section])
        if config.task == "retrofit":
            from dmc_jax.evaluation.side_by_side_options import validate as validate_side_by_side
            validate_side_by_side(config.retrofit, config.get("cache"))
        if trained.validate_run is not None:
            trained.validate_run(config[trained.section], config)
    if "distill" in config and config.task in ("train", "retrofit"):
        from dmc_jax.training.distill import validate as validate_distill
        validate_distill(config.distill)
    if "data" in config and config.task in ("prepare_data", "demo", "train", "retrofit"):
        from dmc_jax.data import options as data_options  # the data section validates itself
        data_options.validate(config.data)
    if config.task in ("train", "retrofit") and config.train.get("stages", ()):
        from dmc_jax.training import stages as staging  # every stage's config is checked before any step runs
        parsed = staging.parse(config)
        for i in range(len(parsed)):
            validate(staging.stage_config(config, parsed, i))


def _trained_method(config: ml_collections.ConfigDict):
    """The registry's TrainedMethod this run trains (task retrofit: retrofit.method's; task train: the objective's),
    or None."""
    from dmc_jax.cache import registry

    if config.task == "retrofit":
        name = config.get("retrofit", {}).get("method", "dmc")
        spec = registry.get(name)
        if spec.trained is None:
            trainable = [n for n in registry.names() if registry.get(n).trained is not None]
            raise UserError(f"retrofit.method {name!r} is training-free; task retrofit trains one of "
                            f"{', '.join(trainable)}")
        return spec.trained
    if config.task in ("train", "plan") and "train" in config:
        return registry.trained(config.train.objective)
    return None


def _bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise UserError(f"{name} must be True or False; got {value!r}")


def _below(name: str, value, high) -> None:
    if not value < high:
        raise UserError(f"{name} must be < {high}; got {value!r}")


def _validate_training(config: ml_collections.ConfigDict) -> None:
    """The train, optim, checkpoint and (optional) mesh sections of task 'train'."""
    from dmc_jax.training.objective import objective_names
    from dmc_jax.training.optimizer import SCHEDULES
    from dmc_jax.training.sharding import AXES

    m, t, o, c = config.model, config.train, config.optim, config.checkpoint
    _one_of("model.param_dtype (training keeps fp32 master weights; set model.compute_dtype=bfloat16 for bf16 "
            "compute)", m.param_dtype, ("float32",))
    _one_of("train.objective", t.objective, objective_names())
    for name in ("steps", "grad_accum", "log_every"):
        _at_least(f"train.{name}", t[name], 1)
    for name in ("eval_every", "eval_batches"):
        _at_least(f"train.{name}", t[name], 0)
    for name in ("progress", "tensorboard"):
        _bool(f"train.{name}", t[name])
    _bool("train.offload_opt_state", t.get("offload_opt_state", False))
    if not o.lr > 0 or o.lr == float("inf"):
        raise UserError(f"optim.lr must be a positive number; got {o.lr!r}")
    _one_of("optim.schedule", o.schedule, SCHEDULES)
    for name in ("warmup_steps", "hold_steps", "decay_steps", "end_lr", "weight_decay", "clip_norm"):
        _at_least(f"optim.{name}", o[name], 0)
    if o.end_lr > o.lr:
        raise UserError(f"optim.end_lr must be <= optim.lr={o.lr}; got {o.end_lr}")
    for name in ("b1", "b2"):
        _at_least(f"optim.{name}", o[name], 0.0)
        _below(f"optim.{name}", o[name], 1.0)
    if not o.eps > 0:
        raise UserError(f"optim.eps must be > 0; got {o.eps!r}")
    _bool("optim.decay_embeddings", o.decay_embeddings)
    freeze = o.get("freeze", ())
    if isinstance(freeze, str) or not all(g in FREEZE_GROUPS for g in freeze):
        raise UserError(f"optim.freeze must be a tuple of groups among {', '.join(FREEZE_GROUPS)} (() = train "
                        f"every weight); got {freeze!r}")
    if not isinstance(c.dir, str):
        raise UserError(f"checkpoint.dir must be a path ('' = <output_dir>/checkpoints); got {c.dir!r}")
    if not isinstance(c.get("init_from", ""), str):
        raise UserError(f"checkpoint.init_from must be a checkpoint directory or <dir>/<step> ('' = none); got "
                        f"{c.init_from!r}")
    _at_least("checkpoint.every_steps", c.every_steps, 0)
    _at_least("checkpoint.max_to_keep", c.max_to_keep, 0)
    for name in ("async_save", "resume"):
        _bool(f"checkpoint.{name}", c[name])
    if m.max_seq_len and config.data.seq_len > m.max_seq_len:
        raise UserError(f"data.seq_len={config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower "
                        f"data.seq_len or raise model.max_seq_len")
    if "mesh" in config:
        sizes = [config.mesh[a] for a in AXES]
        for axis, size in zip(AXES, sizes):
            if not isinstance(size, int) or not (size >= 1 or size == -1):
                raise UserError(f"mesh.{axis} must be a positive device count or -1 (the rest); got {size!r}")
        if sizes.count(-1) > 1:
            raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
        for axis, size in zip(AXES, sizes):
            dcn = config.mesh.get(f"dcn_{axis}", 1)
            if not isinstance(dcn, int) or dcn < 1 or (size != -1 and size % dcn):
                raise UserError(f"mesh.dcn_{axis} must be a positive divisor of mesh.{axis}={size}; got {dcn!r}")
        for rule in config.mesh.rules:
            axes = rule[1] if isinstance(rule, (tuple, list)) and len(rule) == 2 else None
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
                    or any(a not in AXES for a in names)):
                raise UserError(f"mesh.rules entries must be (logical axis name, mesh axis or tuple of mesh axes "
                                f"from {', '.join(AXES)} or None); got {rule!r}")
