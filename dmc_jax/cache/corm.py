"""CORM (Dai et al. 2024, arXiv 2404.15949): evict a key once the last w queries all found it unimportant.

Adjacent queries are similar, so the attention of the last `window` (w) queries predicts what the next one needs.
A key older than the `recent` (r) most recent tokens is evicted once every one of the last w queries gave it
attention below alpha / n (n = number of keys that query saw; alpha = 1: below uniform). Scores are per KV head
(GQA: the mean over the group's query heads).

Instead of the last w attention rows (w floats per key) each kept key carries an equivalent counter, `run`: how
many of the most recent queries in a row gave it attention below the threshold (capped at w); the rule is
run == w. A key is counted only by queries that saw it, so a key is never judged by fewer than w queries.

The budget is adaptive (the compression ratio is an output). budget = 0 (method 'corm') allocates the largest
buffer the sequence could need (max_tokens slots) so that the rule alone decides: entries in use shrink, the
allocation does not. budget = C > 0 (method 'corm_capped') allocates C slots; when the rule leaves more than C
keys, the stalest old key goes: the longest below-threshold run, then the lowest attention from the latest query
(stored as `last`).

Defaults: w = r = 32. w = 32 is the observation window SnapKV found sufficient to predict future attention (the
same observation as CORM's), and r = w means a key leaves the protected recent window exactly when w queries
have judged it. alpha = 1 is the paper's threshold (1/n, "below uniform").

Prefill attends over the whole prompt; the rule is then applied with the last w prompt queries (query i saw
n = i + 1 keys). Shape letters: L layers, B batch, K KV heads, C slots, X = C + 1 decode candidates, T prompt
time, Q window rows, H query heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import registry
from dmc_jax.cache.protocol import RopeFn, RowOps
from dmc_jax.errors import require
from dmc_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class CORMCache(RowOps):
    """Evicts keys that the recent queries all ignore; adaptive size, optionally capped."""

    layout = ev.LAYOUT

    budget: int = 0       # slots per layer, sequence and KV head; 0 = adaptive within max_tokens slots
    window: int = 32      # w: recent queries that must all find a key unimportant
    recent: int = 32      # r: the most recent tokens are never evicted
    alpha: float = 1.0    # threshold alpha / n (1 = below uniform attention)

    def __post_init__(self):
        require(self.window >= 1, f"cache.corm.window must be >= 1; got {self.window}")
        require(self.recent >= 0, f"cache.corm.recent must be >= 0; got {self.recent}")
        require(self.alpha >= 0.0, f"cache.corm.alpha must be >= 0; got {self.alpha}")
        require(self.budget == 0 or self.budget > self.recent,
                f"cache.budget ({self.budget}) must exceed cache.corm.recent ({self.recent}) for corm_capped")

    @property
    def name(self) -> str:
        return "corm_capped" if self.budget else "corm"

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        capacity = min(self.budget, max_tokens) if self.budget else max_tokens
        return ev.init_buffers(cfg, batch, capacity, {"run": (jnp.int32, 0), "last": (jnp.float32, 0.0)})

    @staticmethod
    def _keep_priority(run, last):
        """Higher = more needed: a shorter below-threshold run first, then more attention from the latest query."""
        return last - run.astype(jnp.float32)

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        out_BTHD, q_BTHD, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
        T, w = q_BTHD.shape[1], self.window
        rows_BQ, valid_BQ = ev.last_rows(lengths_B, w)
        probs_BKQT = ev.group_probs(q_BTHD, k_BTKD, rows_BQ, valid_BQ)
        t_T = jnp.arange(T)
        seen_BQT = valid_BQ[:, :, None] & (rows_BQ[:, :, None] >= t_T)
        below_BKQT = seen_BQT[:, None] & (probs_BKQT * (rows_BQ + 1)[:, None, :, None] < self.alpha)
        # Length of the trailing run of below-threshold rows (the last row is the last prompt query).
        last_above_BKT = jnp.max(jnp.where(below_BKQT, -1, jnp.arange(w)[:, None]), axis=2)
        run_BKT = (w - 1 - last_above_BKT).astype(jnp.int32)
        last_BKT = probs_BKQT[:, :, -1]
        old_B1T = (t_T[None] < lengths_B[:, None] - self.recent)[:, None]
        priority_BKT = jnp.where(old_B1T, jnp.where(run_BKT >= w, -ev.INF, self._keep_priority(run_BKT, last_BKT)),
                                 ev.INF)
        kept = ev.keep_top(priority_BKT, lengths_B, state["k"].shape[3], k_BTKD, v_BTKD,
                           {"run": run_BKT, "last": last_BKT})
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        out_BHD, state, step = ev.begin_decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope,
                                               {"run": 0, "last": 0.0})
        C = state["valid"].shape[3]
        probs_BKX = step.probs_BKX
        n_BK1 = jnp.sum(step.valid_BKX, axis=-1, keepdims=True)  # keys this query saw, itself included
        run_BKX = jnp.pad(state["run"][layer], [(0, 0), (0, 0), (0, 1)])
        run_BKX = jnp.where(step.valid_BKX & (probs_BKX * n_BK1 < self.alpha),
                            jnp.minimum(run_BKX + 1, self.window), 0)
        old_BKX = step.valid_BKX & (step.pos_BKX <= positions_B[:, None, None] - self.recent)
        evict_BKX = old_BKX & (run_BKX >= self.window)
        # A full buffer gives the new token a slot the rule freed, else the stalest old key's (capped variant).
        freed_BK = jnp.any(evict_BKX[..., :C], axis=-1)
        stalest_BK = ev.masked_argmin(self._keep_priority(run_BKX, probs_BKX), old_BKX)
        drop_BK = jnp.where(evict_BKX[..., C], C, jnp.where(freed_BK, jnp.argmax(evict_BKX[..., :C], axis=-1),
                                                               stalest_BK))
        return out_BHD, ev.finish_decode(state, layer, step, drop_BK, {"run": run_BKX, "last": probs_BKX},
                                         evict_BKX[..., :C])

    def stats(self, state, tokens_B):
        return ev.buffer_stats(state, tokens_B)


_CORM_DEFAULTS = {"window": 32, "recent": 32, "alpha": 1.0}
_CORM_LEGACY = {"window": "corm_window", "recent": "corm_recent", "alpha": "corm_alpha"}
registry.register(registry.MethodSpec(
    name="corm", adaptive=True, defaults=_CORM_DEFAULTS, legacy=_CORM_LEGACY,
    build=lambda s, hparams: CORMCache(budget=0, window=s.window, recent=s.recent, alpha=s.alpha),
    summary="evicts keys every recent query ignores; adaptive size (Dai et al., 2024)"))
registry.register(registry.MethodSpec(
    name="corm_capped", budgeted=True, defaults=_CORM_DEFAULTS, legacy=_CORM_LEGACY,
    build=lambda s, hparams: CORMCache(budget=s.budget, window=s.window, recent=s.recent, alpha=s.alpha),
    summary="CORM within a fixed budget"))
