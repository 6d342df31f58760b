"""Builds the configured cache method: the only place that knows every method by name."""

from __future__ import annotations

import ml_collections

from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.errors import UserError

METHODS = {"dense": lambda c: DenseCache()}


def make_method(cache_config: ml_collections.ConfigDict) -> CacheMethod:
    """The method named by cache_config.method, with its hyper-parameters from the same section."""
    if cache_config.method not in METHODS:
        raise UserError(f"cache.method must be one of {', '.join(METHODS)}; got {cache_config.method!r}")
    return METHODS[cache_config.method](cache_config)
