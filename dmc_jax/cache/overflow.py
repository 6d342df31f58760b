"""The overflow check of the caches whose per-head buffers can run out of room (DMC padded, DMS): never silent.

State leaves read: lost [L, B, K] (prompt tokens that found no slot at prefill: always an error) and overflow
[L, B, K] (decode tokens that found none: an error unless the method's fallback is allowed).
"""

from __future__ import annotations

import numpy as np

from dmc_jax.errors import UserError


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
