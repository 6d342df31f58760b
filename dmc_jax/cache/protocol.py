"""The one cache protocol every KV-cache method implements (dense, DMC padded/paged, eviction policies).

A method is a static, hashable object (its hyper-parameters); its state is a pytree of arrays stacked over
layers on a leading axis L and carried through the layer scan and the decode loop. The model calls, per layer:

    out_BTHD, state = method.prefill(state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope)
    out_BHD,  state = method.decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope)

q and k arrive BEFORE RoPE: the method decides when to rotate (DMC averages keys before rotating them). `layer`
is a traced int32 scalar; methods write their per-layer slice with dynamic_update_slice at that index so the
scan carry is updated in place. `lengths_B` is the number of real (non-padding) prompt tokens of each right-padded
sequence; `positions_B` is the absolute position of the token being decoded (= tokens already seen).

A serving loop changes the batch between steps through the row operations, which every method has:

    state = method.free_rows(state, done_B)           # finished rows give their storage back (pages, slots)
    sub   = method.take_rows(state, rows_R)           # a batch-R state of those rows (+ any shared pool)
    _, sub = prefill(..., sub, ...)                   # new prompts prefilled there
    state = method.put_rows(state, sub, rows_R)       # written back; then one decode step over every row

Optional attribute `scan_layers` (default False): evaluations (task compare, the retrofit's side by side and
generation sample) run the layers scanned over stacked weights instead of in the layout they were given
(llama.layers_for; task compare's is unrolled per-layer buffers, faster per token). A method whose layer program is
large compiles it once per layer when unrolled: the paged DMS cache's decode (its attention branches over several
table widths) compiled in 33 s unrolled against 3 s scanned on SmolLM2 (2-core CPU), while decoding 4 x 512 tokens
took 20 s against 28 s, so a 512-token evaluation is 20 s faster scanned.

A state's layout (`StateLayout`) says which leaves are shared by all rows (a page pool) and what an empty row holds;
every other leaf is per row, [L, B, ...]. `RowOps` implements the row operations from it once for every method
(the paged DMC cache also returns a freed row's pages to its pool).

Shape letters: L layers, B batch, R selected rows, T time, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Protocol

import jax
import jax.numpy as jnp

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
        """Causal attention over a right-padded prompt, and the layer's cache built from it. A method whose
        `supports_prefill_start` is True also takes starts_B=: the prompt continues rows that already hold
        starts_B tokens (chunked prefill, a conversation's next turn)."""
        ...

    def decode(self, state: State, layer: jax.Array, q_BHD: jax.Array, k_BKD: jax.Array, v_BKD: jax.Array,
               positions_B: jax.Array, rope: RopeFn) -> tuple[jax.Array, State]:
        """Adds one token per sequence to the layer's cache and attends to it."""
        ...

    def stats(self, state: State, tokens_B: jax.Array) -> Dict[str, jax.Array]:
        """Logical compression (tokens seen / entries kept, per layer and head) and bytes allocated / in use."""
        ...

    def free_rows(self, state: State, done_B: jax.Array) -> State:
        """Empties the rows done_B (their storage free for new sequences); jit-able."""
        ...

    def take_rows(self, state: State, rows_R: jax.Array) -> State:
        """A state of batch R: rows rows_R of every per-row leaf, and the shared leaves."""
        ...

    def put_rows(self, state: State, sub: State, rows_R: jax.Array) -> State:
        """Writes a take_rows state back into rows rows_R; the shared leaves come from `sub`."""
        ...


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """How a method's state is laid out over rows.

    shared: leaves shared by every row (a page pool and its free list); every other leaf is [L, B, ...].
    fills: what an empty row holds in a leaf (0 / False for a leaf not named).
    kept: per-row leaves a freed row keeps (diagnostic counters that summarise the run).
    """

    shared: tuple = ()
    fills: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    kept: tuple = ()


class RowOps:
    """The row operations of the protocol, from the method's `layout` (a StateLayout; default: all per row)."""

    layout: StateLayout = StateLayout()

    def free_rows(self, state, done_B):
        out = dict(state)
        for name, x in state.items():
            if name in self.layout.shared or name in self.layout.kept:
                continue
            done = done_B.reshape((1, -1) + (1,) * (x.ndim - 2))
            out[name] = jnp.where(done, jnp.asarray(self.layout.fills.get(name, 0), x.dtype), x)
        return out

    def take_rows(self, state, rows_R):
        return {name: x if name in self.layout.shared else x[:, rows_R] for name, x in state.items()}

    def put_rows(self, state, sub, rows_R):
        return {name: sub[name] if name in self.layout.shared else x.at[:, rows_R].set(sub[name])
                for name, x in state.items()}


def state_bytes(state: State) -> int:
    """Bytes allocated by every array of a cache state."""
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)))
