"""Builds the configured cache method: the only place that knows every method by name."""

from __future__ import annotations

from typing import Optional

import ml_collections

from dmc_jax.cache.corm import CORMCache
from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.dmc_paged import DMCPagedCache
from dmc_jax.cache.dmc_padded import DMCPaddedCache
from dmc_jax.cache.h2o import H2OCache
from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.cache.snapkv import SnapKVCache
from dmc_jax.cache.streaming_llm import StreamingLLMCache
from dmc_jax.cache.tova import TOVACache
from dmc_jax.errors import UserError


def _dms(c):
    """DMS cache: hyper-parameters from the cache section's `dms` subsection (configs/smollm2_dms.py), else defaults."""
    from dmc_jax.cache.dms import DMSCache
    from dmc_jax.dms.objective import default_config, dms_config
    return DMSCache(dms_config(c.get("dms") or default_config()), capacity=c.capacity, target_cr=c.target_cr,
                    margin=c.margin, on_overflow=c.on_overflow)


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
    "dms": lambda c: _dms(c),
}


# DMC caches take the DMC hyper-parameters (window, channel, offset, ...) from the config's `dmc` section.
DMC_METHODS = {
    "dmc": lambda c, dmc: DMCPaddedCache(dmc, capacity=c.capacity, target_cr=c.target_cr, margin=c.margin,
                                         on_overflow=c.on_overflow),
    "dmc_paged": lambda c, dmc: DMCPagedCache(dmc, page_size=c.page_size, pages=c.pages, target_cr=c.target_cr,
                                              margin=c.margin, on_overflow=c.on_overflow,
                                              attend_growth=c.attend_growth, kernels=c.kernels),
}


def _dmc_hparams(dmc_section: Optional[ml_collections.ConfigDict]):
    from dmc_jax.dmc.objective import default_config, dmc_config  # the dmc section's schema lives there
    return dmc_config(default_config() if dmc_section is None else dmc_section)


def make_method(cache_config: ml_collections.ConfigDict,
                dmc_section: Optional[ml_collections.ConfigDict] = None) -> CacheMethod:
    """The method named by cache_config.method, with its hyper-parameters from the same section (and, for DMC
    caches, from the config's `dmc` section: pass config.get('dmc'); None = the reference defaults)."""
    names = (*METHODS, *DMC_METHODS)
    if cache_config.method not in names:
        raise UserError(f"cache.method must be one of {', '.join(names)}; got {cache_config.method!r}")
    try:
        if cache_config.method in DMC_METHODS:
            return DMC_METHODS[cache_config.method](cache_config, _dmc_hparams(dmc_section))
        return METHODS[cache_config.method](cache_config)
    except AttributeError as e:  # a config written before the field existed
        raise UserError(f"the cache section lacks a field cache.{cache_config.method} needs ({e}); "
                        f"start from configs/smollm2.py") from None
