"""Builds the configured cache method: the only place that knows every method by name."""

from __future__ import annotations

import ml_collections

from dmc_jax.cache.corm import CORMCache
from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.h2o import H2OCache
from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.cache.snapkv import SnapKVCache
from dmc_jax.cache.streaming_llm import StreamingLLMCache
from dmc_jax.cache.tova import TOVACache
from dmc_jax.errors import UserError


def _corm(c, budget):
    return CORMCache(budget=budget, window=c.corm_window, recent=c.corm_recent, alpha=c.corm_alpha)


METHODS = {
    "dense": lambda c: DenseCache(),
    "streaming_llm": lambda c: StreamingLLMCache(budget=c.budget, n_sink=c.n_sink),
    "h2o": lambda c: H2OCache(budget=c.budget, recent_ratio=c.h2o_recent_ratio),
    "tova": lambda c: TOVACache(budget=c.budget, per_head=c.tova_per_head),
    "snapkv": lambda c: SnapKVCache(budget=c.budget, window=c.snapkv_window, kernel=c.snapkv_kernel,
                                    decode_evict=c.snapkv_decode_evict),
    "corm": lambda c: _corm(c, 0),  # adaptive: the rule alone decides (buffer = max_tokens slots)
    "corm_capped": lambda c: _corm(c, c.budget),
}


def make_method(cache_config: ml_collections.ConfigDict) -> CacheMethod:
    """The method named by cache_config.method, with its hyper-parameters from the same section."""
    if cache_config.method not in METHODS:
        raise UserError(f"cache.method must be one of {', '.join(METHODS)}; got {cache_config.method!r}")
    try:
        return METHODS[cache_config.method](cache_config)
    except AttributeError as e:  # a config written before the field existed
        raise UserError(f"the cache section lacks a field cache.{cache_config.method} needs ({e}); "
                        f"start from configs/smollm2.py") from None
