"""SnapKV (Li et al. 2024): select the prompt tokens the last prompt queries attend to, once, at prefill.

Each prompt token older than the observation window (the last `window` prompt tokens) is scored by the attention
it receives from the window's queries (summed over the window, averaged over each group's query heads), smoothed
by 1-D average pooling (`kernel`, zero padded); the buffer of C = budget slots keeps the top C - window of them
plus the window itself.

SnapKV compresses the prompt only; decoding appends. When a decode token finds the buffer full, a budget policy
drops one token older than the last `window` tokens (`decode_evict`):
    'score'   the lowest observation score among the prompt tokens that were scored; once none is left, the
              oldest (the window's tokens and generated tokens have no score). Keeps SnapKV's selection order.
    'oldest'  the oldest: the buffer slides, sinks not kept.

Shape letters: L layers, B batch, K KV heads, C slots, X = C + 1 decode candidates, T prompt time, Q window rows,
H query heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import registry
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout
from dmc_jax.errors import require
from dmc_jax.model.config import ModelConfig

DECODE_EVICT = ("score", "oldest")


@dataclasses.dataclass(frozen=True)
class SnapKVCache(RowOps):
    """Observation-window selection of the prompt, then a budget policy while decoding."""

    layout = StateLayout(fills={**ev.LAYOUT.fills, "score": ev.INF})

    budget: int = 256             # slots per layer, sequence and KV head
    window: int = 32              # observation window: the last prompt queries (the paper's 32)
    kernel: int = 5               # average pooling of the scores (the paper's 5)
    decode_evict: str = "score"   # what a full buffer drops while decoding: 'score' | 'oldest'
    name: str = "snapkv"

    def __post_init__(self):
        require(self.window >= 1, f"cache.snapkv.window must be >= 1; got {self.window}")
        require(self.budget > self.window, f"cache.budget ({self.budget}) must exceed cache.snapkv.window "
                                           f"({self.window}) to leave room for selected tokens")
        require(self.kernel >= 1 and self.kernel % 2 == 1,
                f"cache.snapkv.kernel must be an odd number >= 1; got {self.kernel}")
        require(self.decode_evict in DECODE_EVICT,
                f"cache.snapkv.decode_evict must be one of {', '.join(DECODE_EVICT)}; got {self.decode_evict!r}")

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        return ev.init_buffers(cfg, batch, min(self.budget, max_tokens), {"score": (jnp.float32, ev.INF)})

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        out_BTHD, q_BTHD, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
        T = q_BTHD.shape[1]
        rows_BQ, valid_BQ = ev.last_rows(lengths_B, self.window)
        observed_BKT = jnp.sum(ev.group_probs(q_BTHD, k_BTKD, rows_BQ, valid_BQ), axis=2)
        prefix_B1T = (jnp.arange(T)[None] < lengths_B[:, None] - self.window)[:, None]
        pooled_BKT = ev.avg_pool(jnp.where(prefix_B1T, observed_BKT, 0.0), self.kernel)
        score_BKT = jnp.where(prefix_B1T, pooled_BKT, ev.INF)  # the window is kept and carries no score
        kept = ev.keep_top(score_BKT, lengths_B, state["k"].shape[3], k_BTKD, v_BTKD, {"score": score_BKT})
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        out_BHD, state, step = ev.begin_decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope,
                                               {"score": ev.INF})
        score_BKX = jnp.pad(state["score"][layer], [(0, 0), (0, 0), (0, 1)], constant_values=ev.INF)
        old_BKX = step.valid_BKX & (step.pos_BKX <= positions_B[:, None, None] - self.window)
        drop_BK = ev.masked_argmin(step.pos_BKX, old_BKX)
        if self.decode_evict == "score":
            scored_BKX = old_BKX & jnp.isfinite(score_BKX)
            drop_BK = jnp.where(jnp.any(scored_BKX, axis=-1), ev.masked_argmin(score_BKX, scored_BKX), drop_BK)
        return out_BHD, ev.finish_decode(state, layer, step, drop_BK, {"score": score_BKX})

    def stats(self, state, tokens_B):
        return ev.buffer_stats(state, tokens_B)


registry.register(registry.MethodSpec(
    name="snapkv", budgeted=True, defaults={"window": 32, "kernel": 5, "decode_evict": "score"},
    legacy={"window": "snapkv_window", "kernel": "snapkv_kernel", "decode_evict": "snapkv_decode_evict"},
    build=lambda s, hparams: SnapKVCache(budget=s.budget, window=s.window, kernel=s.kernel,
                                         decode_evict=s.decode_evict),
    summary="prompt tokens selected by an observation window (Li et al., NeurIPS 2024)"))
