"""Validates a run config once, at start: every bad field is a UserError naming the field and what is allowed."""

from __future__ import annotations

import ml_collections

from dmc_jax.errors import UserError
from dmc_jax.model.config import DTYPES

TASKS = ("demo", "generate", "eval", "bench", "prepare_data")
CACHE_METHODS = ("dense", "streaming_llm", "h2o", "tova", "snapkv", "corm", "corm_capped")


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
    _sections(config, ("model",))
    m = config.model
    _one_of("model.param_dtype", m.param_dtype, sorted(DTYPES))
    _one_of("model.compute_dtype", m.compute_dtype, sorted(DTYPES))
    _at_least("model.max_seq_len", m.max_seq_len, 0)
    if not m.source:
        raise UserError("model.source is empty; use 'smollm2', a .gguf file or a Hugging Face model directory")
    if "cache" in config:
        _one_of("cache.method", config.cache.method, CACHE_METHODS)
        from dmc_jax.cache.registry import make_method  # each method checks the ranges of its own fields
        make_method(config.cache)
    if config.task in ("generate", "demo"):
        _sections(config, ("generate", "cache"))
        g = config.generate
        _at_least("generate.max_new_tokens", g.max_new_tokens, 1)
        _at_least("generate.temperature", g.temperature, 0.0)
        _at_least("generate.top_k", g.top_k, 0)
        if not 0.0 < g.top_p <= 1.0:
            raise UserError(f"generate.top_p must be in (0, 1] (1 = off); got {g.top_p}")
    if config.task in ("eval", "demo"):
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
        if not b.batch_sizes or any(int(x) < 1 for x in b.batch_sizes):
            raise UserError(f"bench.batch_sizes must be a non-empty tuple of positive ints; got {b.batch_sizes}")
    if "data" in config and config.task in ("prepare_data", "demo"):
        from dmc_jax.data import options as data_options  # the data section validates itself
        data_options.validate(config.data)
