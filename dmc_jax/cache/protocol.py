"""The one cache protocol every KV-cache method implements (dense, DMC padded/paged, eviction policies).

A method is a static, hashable object (its hyper-parameters); its state is a pytree of arrays stacked over
layers on a leading axis L and carried through the layer scan and the decode loop. The model calls, per layer:

    out_BTHD, state = method.prefill(state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope)
    out_BHD,  state = method.decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope)

q and k arrive BEFORE RoPE: the method decides when to rotate (DMC averages keys before rotating them). `layer`
is a traced int32 scalar; methods write their per-layer slice with dynamic_update_slice at that index so the
scan carry is updated in place. `lengths_B` is the number of real (non-padding) prompt tokens of each right-padded
sequence; `positions_B` is the absolute position of the token being decoded (= tokens already seen).

Shape letters: L layers, B batch, T time, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Protocol

import jax

from dmc_jax.model.config import ModelConfig

State = Any  # a pytree of arrays, leading axis L on per-layer leaves
RopeFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x_BTND, positions_BT) -> rotated x_BTND


class CacheMethod(Protocol):
    """What the model and the decode loop need from a KV-cache method."""

    name: str

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int) -> State:
        """Empty state for `batch` sequences of at most `max_tokens` tokens (prompt + generation)."""
        ...

    def prefill(self, state: State, layer: jax.Array, q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array,
                lengths_B: jax.Array, rope: RopeFn) -> tuple[jax.Array, State]:
        """Causal attention over a right-padded prompt, and the layer's cache built from it."""
        ...

    def decode(self, state: State, layer: jax.Array, q_BHD: jax.Array, k_BKD: jax.Array, v_BKD: jax.Array,
               positions_B: jax.Array, rope: RopeFn) -> tuple[jax.Array, State]:
        """Adds one token per sequence to the layer's cache and attends to it."""
        ...

    def stats(self, state: State, tokens_B: jax.Array) -> Dict[str, jax.Array]:
        """Logical compression (tokens seen / entries kept, per layer and head) and bytes allocated / in use."""
        ...


def state_bytes(state: State) -> int:
    """Bytes allocated by every array of a cache state."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
