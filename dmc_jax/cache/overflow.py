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


def check_pool(state, cache: str, section: str, lost_unit: str, failed: str, counted: str, fallback: str,
               allow_fallback: bool) -> None:
    """The paged caches' check (DMC and DMS): UserError naming the first (layer, head, sequence) the shared page pool
    failed. state: refused [2] (pool refusals, [decode, prefill]), lost / overflow [L, B, K], pool_pos or pool_k
    [P, N, ...]. Prompt tokens without a page are always an error; decode refusals unless allow_fallback.

    cache: 'DMC paged cache'; section: its config section; lost_unit: what a prompt lost ('slots', 'tokens');
    failed / counted: what a refused decode step did ('found no free page', 'appends merged instead'); fallback:
    the on_overflow value that allows it."""
    P, N = (state["pool_pos"] if "pool_pos" in state else state["pool_k"]).shape[:2]
    refused = np.asarray(state["refused"])
    pool = f"the pool has {P} pages of {N} slots"
    fix = f"raise cache.{section}.pages (or cache.{section}.margin, or lower cache.{section}.target_cr)"
    lost_LBK = np.asarray(state["lost"])
    if lost_LBK.any() or refused[1]:
        where = "a row admitted since"
        if lost_LBK.any():
            l, b, k = (int(i) for i in np.argwhere(lost_LBK)[0])
            where = f"layer {l}, KV head {k} (sequence {b}) lost {int(lost_LBK[l, b, k])} {lost_unit}"
        raise UserError(f"{cache} out of pages for a new sequence: {where}; {pool}; {fix}")
    overflow_LBK = np.asarray(state["overflow"])
    if not allow_fallback and refused[0]:
        where = "in a row admitted since"
        if overflow_LBK.any():
            l, b, k = (int(i) for i in np.argwhere(overflow_LBK)[0])
            where = f"layer {l}, KV head {k} (sequence {b})"
        raise UserError(f"{cache} overflow: {where} {failed} ({int(refused[0])} {counted} in all); {pool}; {fix}, "
                        f"or set cache.{section}.on_overflow='{fallback}'")
