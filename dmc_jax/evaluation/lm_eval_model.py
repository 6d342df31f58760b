"""The model and cache method behind the lm-eval backend, from its model_args (lm-eval itself is not imported).

`model_and_methods` is the only place here that calls the method registry and the model loader. A method is chosen
per request: `ratio=R` gives a budgeted eviction method the budget ceil(L / R) for a request whose cache receives
L tokens (context + continuation when scoring, the prompt when generating), rounded up to a multiple of
`budget_step` so that a task compiles a few shapes, not one per length; `budget=N` fixes it. Dense, CORM
(adaptive) and DMC caches take no budget (a DMC cache is sized by the CR its model was trained for).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import ml_collections

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.errors import UserError

BUDGETED = ("streaming_llm", "h2o", "tova", "snapkv", "corm_capped")  # cache.budget sets their CR

# The cache section's fields and defaults (as in configs/smollm2.py); any of them is a model_arg.
CACHE_DEFAULTS = dict(
    budget=256, n_sink=4, h2o_recent_ratio=0.5, tova_per_head=False, snapkv_window=32, snapkv_kernel=5,
    snapkv_decode_evict="score", corm_window=32, corm_recent=32, corm_alpha=1.0, capacity=0, target_cr=0.0,
    margin=1.25, on_overflow="error", page_size=16, pages=0, attend_growth=1.4142, kernels="auto")


@dataclasses.dataclass
class Loaded:
    """The loaded model and `method_for(L)`: the cache method for a request whose cache receives L tokens."""

    model: object  # dmc_jax.weights.LoadedModel (cfg, params, tokenizer, source)
    method_for: Callable[[int], CacheMethod]
    description: dict


def typed(name: str, value, default):
    """value (a string from the command line, or already typed) as the type of default."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "1")
            return bool(value)
        return type(default)(value)
    except (TypeError, ValueError):
        raise UserError(f"model_args {name}={value!r}: expected a {type(default).__name__}") from None


def model_and_methods(source: str, cache: str, cache_fields: dict, dtype: str, max_length: int, seed: int):
    """(the loaded model, budget -> cache method `cache`; budget None: the section's own). The only call sites of
    the model loader and the method registry."""
    from dmc_jax.cache.registry import make_method
    from dmc_jax.dmc.export import method_sections
    from dmc_jax.tasks.common import load_model

    section = ml_collections.ConfigDict({"method": cache, **CACHE_DEFAULTS, **cache_fields})
    config = ml_collections.ConfigDict({
        "seed": seed, "cache": section, "model": {"source": source, "param_dtype": dtype, "compute_dtype": dtype,
                                                  "max_seq_len": max_length, "remat": False, "remat_policy": ""}})
    if cache.startswith("dmc"):  # the model directory's dmc_config.json: DMC hyper-parameters, the trained CR
        method = make_method(*method_sections(config))
        return load_model(config), lambda budget: method
    made = {}

    def make(budget: Optional[int]) -> CacheMethod:
        if budget not in made:
            s = ml_collections.ConfigDict(section.to_dict())
            if budget is not None:
                s.budget = budget
            made[budget] = make_method(s)
        return made[budget]
    make(None)  # a bad field or value fails now, before the model loads
    return load_model(config), make


def load(source: Optional[str] = None, cache: str = "dense", ratio=None, budget=None, budget_step=8,
         max_length=0, dtype: str = "float32", seed=0, **cache_fields) -> Loaded:
    """The model of `source` and its method factory, every argument checked (UserError: one line)."""
    from dmc_jax.cache.registry import DMC_METHODS, METHODS

    if not source:
        raise UserError("model_args needs source=: 'smollm2', a .gguf file, a Hugging Face directory (a retrofitted "
                        "DMC model included) or 'tiny'")
    names = (*METHODS, *DMC_METHODS)
    if cache not in names:
        raise UserError(f"model_args cache={cache!r} is not a cache method; use one of {', '.join(names)}")
    unknown = sorted(set(cache_fields) - set(CACHE_DEFAULTS))
    if unknown:
        raise UserError(f"model_args {unknown[0]!r} is not an argument of the dmc_jax backend; use source, cache, "
                        f"ratio, budget, budget_step, max_length, dtype, seed, batch_size, add_bos, max_gen_toks, "
                        f"context_pad, continuation_pad or a cache field ({', '.join(CACHE_DEFAULTS)})")
    fields = {k: typed(k, v, CACHE_DEFAULTS[k]) for k, v in cache_fields.items()}
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"model_args dtype={dtype!r}: use float32 or bfloat16")
    if ratio is not None and budget is not None:
        raise UserError("model_args ratio= and budget= exclude each other: ratio sets each request's budget")
    if (ratio is not None or budget is not None) and cache not in BUDGETED:
        raise UserError(f"model_args ratio=/budget= apply to the budgeted caches ({', '.join(BUDGETED)}), not "
                        f"cache={cache}" + (" (a DMC cache is sized by its model's trained CR)"
                                            if cache.startswith("dmc") else ""))
    if cache in BUDGETED and ratio is None and budget is None:
        raise UserError(f"cache={cache} needs ratio=R (each request keeps 1/R of its tokens) or budget=N (slots)")
    ratio = None if ratio is None else typed("ratio", ratio, 1.0)
    if ratio is not None and ratio < 1:
        raise UserError(f"model_args ratio={ratio} must be >= 1 (the compression ratio)")
    step = typed("budget_step", budget_step, 1)
    if step < 1:
        raise UserError(f"model_args budget_step={step} must be >= 1")
    if budget is not None:
        fields["budget"] = typed("budget", budget, 1)
    seed, max_length = typed("seed", seed, 0), typed("max_length", max_length, 0)

    model, make = model_and_methods(source, cache, fields, dtype, max_length, seed)
    if model.tokenizer is None:
        raise UserError(f"model {source} has no tokenizer; lm-eval passes text, so the backend needs one")

    def method_for(tokens: int) -> CacheMethod:
        if ratio is None:
            return make(None)
        return make(step * math.ceil(math.ceil(tokens / ratio) / step))

    description = {"source": source, "cache": cache, "ratio": ratio, "budget": fields.get("budget") if cache in
                   BUDGETED and ratio is None else None, "budget_step": step if ratio is not None else None,
                   "dtype": dtype, "max_length": model.cfg.max_seq_len}
    return Loaded(model, method_for, description)
