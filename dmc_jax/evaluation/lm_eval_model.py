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


def cache_fields(cache: str) -> dict:
    """The model_args a cache takes besides the backend's own, with their defaults: `budget` for a budgeted method
    and the method's own fields (the registry's defaults), also under the older flat names (h2o_recent_ratio)."""
    from dmc_jax.cache import registry

    spec = registry.get(cache)
    fields = {"budget": 256} if spec.budgeted else {}
    fields.update(spec.defaults)
    fields.update({flat: spec.defaults[own] for own, flat in spec.legacy.items() if flat not in fields})
    return fields


def model_and_methods(source: str, cache: str, fields: dict, dtype: str, max_length: int, seed: int):
    """(the loaded model, budget -> cache method `cache`; budget None: the section's own). The only call sites of
    the model loader and the method registry."""
    from dmc_jax.cache import model_method, registry
    from dmc_jax.tasks.common import load_model

    spec = registry.get(cache)
    own = {k: v for k, v in fields.items() if k in spec.defaults}
    flat = {k: v for k, v in fields.items() if k not in spec.defaults and k != "budget"}
    section = ml_collections.ConfigDict({"method": cache, "budget": fields.get("budget", 256), **flat, cache: own})
    config = ml_collections.ConfigDict({
        "seed": seed, "cache": section, "model": {"source": source, "param_dtype": dtype, "compute_dtype": dtype,
                                                  "max_seq_len": max_length, "remat": False, "remat_policy": ""}})
    resolved = model_method.resolve(config)  # a model directory's kv_method.json: trained hyper-parameters and CR
    made = {}

    def make(budget: Optional[int]) -> CacheMethod:
        if budget not in made:
            made[budget] = resolved.make(**({} if budget is None else {"budget": budget}))
        return made[budget]
    make(None)  # a bad field or value fails now, before the model loads
    return load_model(config), make


def load(source: Optional[str] = None, cache: str = "dense", ratio=None, budget=None, budget_step=8,
         max_length=0, dtype: str = "float32", seed=0, **cache_fields_given) -> Loaded:
    """The model of `source` and its method factory, every argument checked (UserError: one line)."""
    from dmc_jax.cache import registry

    if not source:
        raise UserError("model_args needs source=: 'smollm2', a .gguf file, a Hugging Face directory (a retrofitted "
                        "DMC model included) or 'tiny'")
    names = registry.names()
    if cache not in names:
        raise UserError(f"model_args cache={cache!r} is not a cache method; use one of {', '.join(names)}")
    spec = registry.get(cache)
    known = cache_fields(cache)
    unknown = sorted(set(cache_fields_given) - set(known))
    if unknown:
        raise UserError(f"model_args {unknown[0]!r} is not an argument of the dmc_jax backend with cache={cache}; use "
                        f"source, cache, ratio, budget, budget_step, max_length, dtype, seed, batch_size, add_bos, "
                        f"max_gen_toks, context_pad, continuation_pad or a field of the cache "
                        f"({', '.join(known) or 'none'})")
    budgeted = tuple(n for n in names if registry.get(n).budgeted)
    fields = {k: typed(k, v, known[k]) for k, v in cache_fields_given.items()}
    if dtype not in ("float32", "bfloat16"):
        raise UserError(f"model_args dtype={dtype!r}: use float32 or bfloat16")
    if ratio is not None and budget is not None:
        raise UserError("model_args ratio= and budget= exclude each other: ratio sets each request's budget")
    if (ratio is not None or budget is not None) and cache not in budgeted:
        raise UserError(f"model_args ratio=/budget= apply to the budgeted caches ({', '.join(budgeted)}), not "
                        f"cache={cache}" + (" (a DMC cache is sized by its model's trained CR)"
                                            if spec.trained is not None else ""))
    if cache in budgeted and ratio is None and budget is None:
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
                   budgeted and ratio is None else None, "budget_step": step if ratio is not None else None,
                   "dtype": dtype, "max_length": model.cfg.max_seq_len}
    return Loaded(model, method_for, description)
