"""H2O, the heavy-hitter oracle (Zhang et al. 2023): keep the keys with the most accumulated attention.

Per (sequence, KV head) each kept key carries the attention it has received from every query so far (averaged
over the group's query heads): after prefill the column sums of the prompt's causal attention matrix, then each
decode step adds the new query's row. The buffer of C = budget slots holds the `recent` most recent tokens plus
the C - recent tokens older than that window with the highest accumulated scores (when full, the lowest-scoring
old token is dropped). The paper's budget is 10% heavy + 10% recent of the length, hence recent = half.

Shape letters: L layers, B batch, K KV heads, C slots, X = C + 1 decode candidates, T prompt time, H query heads,
Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import registry
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout
from dmc_jax.errors import require
from dmc_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class H2OCache(RowOps):
    """Heavy hitters by accumulated attention + a recent window."""

    layout = StateLayout(fills={**ev.LAYOUT.fills, "score": 0.0})

    budget: int = 256          # slots per layer, sequence and KV head
    recent_ratio: float = 0.5  # share of the budget for the recent window (paper: 10% + 10% of the length)
    name: str = "h2o"

    def __post_init__(self):
        require(self.budget >= 1, f"cache.budget must be >= 1; got {self.budget}")
        require(0.0 <= self.recent_ratio <= 1.0,
                f"cache.h2o.recent_ratio must be in [0, 1]; got {self.recent_ratio}")

    @property
    def recent(self) -> int:
        """Slots of the recent window (the current token included)."""
        return int(round(self.budget * self.recent_ratio))

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        return ev.init_buffers(cfg, batch, min(self.budget, max_tokens), {"score": (jnp.float32, 0.0)})

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        out_BTHD, q_BTHD, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
        B, T = q_BTHD.shape[:2]
        rows_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        score_BKT = ev.column_sums(q_BTHD, k_BTKD, lengths_B)  # column sums over the real queries
        recent_BT = rows_BT >= lengths_B[:, None] - self.recent
        priority_BKT = jnp.where(recent_BT[:, None], ev.INF, score_BKT)
        kept = ev.keep_top(priority_BKT, lengths_B, state["k"].shape[3], k_BTKD, v_BTKD, {"score": score_BKT})
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        out_BHD, state, step = ev.begin_decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope, {"score": 0.0})
        score_BKC = state["score"][layer]
        score_BKX = jnp.pad(score_BKC, [(0, 0), (0, 0), (0, 1)]) + step.probs_BKX
        recent_BKX = step.pos_BKX > positions_B[:, None, None] - self.recent
        drop_BK = ev.masked_argmin(score_BKX, step.valid_BKX & ~recent_BKX)
        return out_BHD, ev.finish_decode(state, layer, step, drop_BK, {"score": score_BKX})

    def stats(self, state, tokens_B):
        return ev.buffer_stats(state, tokens_B)


registry.register(registry.MethodSpec(
    name="h2o", budgeted=True, defaults={"recent_ratio": 0.5}, legacy={"recent_ratio": "h2o_recent_ratio"},
    build=lambda s, hparams: H2OCache(budget=s.budget, recent_ratio=s.recent_ratio),
    summary="heavy hitters by accumulated attention + recent window (Zhang et al., NeurIPS 2023)"))
