"""A model trained for a decision-channel method, served by ANOTHER cache method: `ZeroedChannel`.

DMC and DMS (decision='q_channel') read their decisions from one channel of q (and, for DMC, k) and then zero that
channel, before RoPE and (zero_after_rope) again after it, so attention never sees it. The weights of such a model
still write the decision logit into that channel. Served with a cache that knows nothing of decisions (dense, H2O,
TOVA, ...), the logit would leak into every attention score of the heads that carry it: not the model that was
trained, and silently so. This wrapper hands the inner method q and k as the trained attention uses them when it
evicts or merges nothing: channel ch zeroed before RoPE, and after RoPE when the model was trained that way. It is
how a trained model's own weights are compared with training-free eviction (task compare's extra models with a
method other than the model's own; model_method.resolve applies it for every task).

Which heads: DMC zeroes channel ch of every query and key head; DMS of the first query head of each KV group
(`first_of_group`; keys keep it). The model hands methods q and k before RoPE and one rope function for both; the
wrapper tells them apart by head count (q has H heads, k K). With H == K (multi-head attention) every query head is
a decision head, so the rotated key channel is zeroed too: no query reads it, so attention is unchanged.

Shape letters: B batch, T time, N heads (H query or K KV), H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax

from dmc_jax.cache.protocol import RopeFn
from dmc_jax.dmc.decisions import zero_channel
from dmc_jax.dms.decisions import zero_decision_heads


def rope_zeroing_queries(rope: RopeFn, num_heads: int, zero: Callable[[jax.Array], jax.Array]) -> RopeFn:
    """RoPE, then `zero` on what it rotates with num_heads (H) heads: the queries, as the model hands methods q and k
    to one rope function (with H == K the keys too, which no query reads in that channel: harmless)."""

    def rotated(x_BTND, positions_BT):
        out_BTND = rope(x_BTND, positions_BT)
        return zero(out_BTND) if out_BTND.shape[-2] == num_heads else out_BTND

    return rotated


@dataclasses.dataclass(frozen=True)
class ZeroedChannel:
    """Runs `inner` on q (and k) with decision channel `channel` (an index in [0, Dh) or negative from the end)
    zeroed: of every head (first_of_group False, keys too) or of the first query head of each group (keys kept)."""

    inner: object  # a CacheMethod
    channel: int
    first_of_group: bool
    keys: bool
    after_rope: bool

    @property
    def name(self) -> str:
        return self.inner.name

    def __getattr__(self, attr):  # init, stats, check, the row operations, layout, scan_layers, ...: the inner's
        if attr == "inner":  # not set yet (copy/pickle): no recursion
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    def _zero(self, x_ND: jax.Array, num_kv_heads: int) -> jax.Array:
        """x ([..., N, Dh]) with the channel zeroed in the heads this model's attention zeroes it in."""
        ch = self.channel % x_ND.shape[-1]
        return zero_decision_heads(x_ND, num_kv_heads, ch) if self.first_of_group else zero_channel(x_ND, ch)

    def _inputs(self, q_BTHD: jax.Array, k_BTKD: jax.Array):
        K = k_BTKD.shape[-2]
        return self._zero(q_BTHD, K), self._zero(k_BTKD, K) if self.keys else k_BTKD

    def _rope(self, rope: RopeFn, H: int, K: int) -> RopeFn:
        if not self.after_rope:
            return rope
        if self.keys:  # queries and keys alike
            return lambda x_BTND, positions_BT: self._zero(rope(x_BTND, positions_BT), K)
        return rope_zeroing_queries(rope, H, lambda x_BTHD: self._zero(x_BTHD, K))

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope, **extra):
        q_BTHD, k_BTKD = self._inputs(q_BTHD, k_BTKD)
        return self.inner.prefill(state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B,
                                  self._rope(rope, q_BTHD.shape[-2], k_BTKD.shape[-2]), **extra)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope, **extra):
        q_BHD, k_BKD = self._inputs(q_BHD, k_BKD)
        return self.inner.decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B,
                                 self._rope(rope, q_BHD.shape[-2], k_BKD.shape[-2]), **extra)
