"""Activation sharding hints: the model names the axes of a few activations, the running train step maps them.

The training step traces the model inside `activation_sharding(spec_fn)`, where spec_fn(logical names, shape)
returns a jax.sharding.Sharding (from the mesh rules, dmc_jax/training/sharding.py); `constrain` then pins that
activation with `jax.lax.with_sharding_constraint`. Outside such a context (inference, tests) it does nothing.
Without the hints XLA's propagation may shard activations like the FSDP-sharded weights they meet (width over
fsdp) and replicate the batch, which multiplies activation memory by the fsdp size.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Optional

import jax

_SPEC_FN: contextvars.ContextVar[Optional[Callable]] = contextvars.ContextVar("activation_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(spec_fn: Callable):
    """While tracing inside this block, constrain() maps logical names with spec_fn(names, shape) -> Sharding."""
    token = _SPEC_FN.set(spec_fn)
    try:
        yield
    finally:
        _SPEC_FN.reset(token)


def constrain(x: jax.Array, logical: tuple) -> jax.Array:
    """x pinned to the sharding of its logical axis names (e.g. ('batch', None, None)), or x unchanged."""
    spec_fn = _SPEC_FN.get()
    if spec_fn is None:
        return x
    return jax.lax.with_sharding_constraint(x, spec_fn(logical, x.shape))
