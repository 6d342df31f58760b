"""The caches whose per-head buffers can run out of room (DMC padded and paged, DMS): their sizing fields' checks and
the overflow check, never silent.

State leaves read: lost [L, B, K] (prompt tokens that found no slot at prefill: always an error) and overflow
[L, B, K] (decode tokens that found none: an error unless the method's fallback is allowed).
"""

from __future__ import annotations

import numpy as np

from dmc_jax.errors import UserError


def check_sizing(method: str, size_field: str, size: int, target_cr: float, margin: float, on_overflow: str,
                 allowed) -> None:
    """UserError naming cache.<method>.<field> for a size (capacity, pages) < 0, a target CR neither 0 (off) nor
    >= 1, a margin < 1 or an on_overflow not in `allowed`."""
    if on_overflow not in allowed:
        raise UserError(f"cache.{method}.on_overflow must be one of {', '.join(allowed)}; got {on_overflow!r}")
    if size < 0 or target_cr < 0 or (target_cr and target_cr < 1):
        raise UserError(f"cache.{method}.{size_field} must be >= 0 and cache.{method}.target_cr 0 (off) or >= 1")
    if margin < 1:
        raise UserError(f"cache.{method}.margin must be >= 1; got {margin}")


def check_buffer(state, cache: str, prefill_what: str, decode_what: str, fix: str, fallback: str,
                 allow_fallback: bool) -> None:
    """UserError naming the first (layer, head, sequence) that ran out of room in `cache` (e.g. 'DMC cache').

    prefill_what / decode_what: how to count the missing room ('slots for the prompt', 'appends'); fix: what to
    raise; fallback: the on_overflow setting that allows decode overflow (merge, evict)."""
    C = state["k"].shape[3]
    lost_LBK = np.asarray(state["lost"])
    if lost_LBK.any():
        l, b, k = (int(i) for i in np.argwhere(lost_LBK)[0])
        raise UserError(f"{cache} overflow at prefill: layer {l}, KV head {k} (sequence {b}) needs "
                        f"{C + int(lost_LBK[l, b, k])} {prefill_what}, capacity is {C}; {fix}")
    overflow_LBK = np.asarray(state["overflow"])
    if not allow_fallback and overflow_LBK.any():
        l, b, k = (int(i) for i in np.argwhere(overflow_LBK)[0])
        raise UserError(f"{cache} overflow: layer {l}, KV head {k} (sequence {b}) needed more than {C} slots "
                        f"({int(overflow_LBK.sum())} {decode_what} found no slot in all); {fix}, or set {fallback}")
