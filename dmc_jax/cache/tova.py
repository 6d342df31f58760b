"""TOVA, token omission via attention (Oren et al. 2024): drop the token the current query attends to least.

Score = the current query's attention probabilities averaged over all heads of the layer (per_head: over the
query heads of each KV head only). Right after prefill the buffer keeps the C = budget prompt tokens that the last
prompt token attends to most; while decoding, a full buffer drops the lowest-scoring of its C tokens and the new
one (the new token itself may go), one per step. With the layer mean every KV head keeps the same tokens.

Shape letters: L layers, B batch, K KV heads, C slots, X = C + 1 decode candidates, T prompt time, H query heads,
Dh head dim.
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
class TOVACache(RowOps):
    """Keeps the tokens the current query attends to most."""

    layout = ev.LAYOUT

    budget: int = 256       # slots per layer, sequence and KV head
    per_head: bool = False  # the paper's policy is per layer (mean over heads); True: per KV head
    name: str = "tova"

    def __post_init__(self):
        require(self.budget >= 1, f"cache.budget must be >= 1; got {self.budget}")

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        return ev.init_buffers(cfg, batch, min(self.budget, max_tokens))

    def _score(self, probs_BKN):
        """Per-KV-head scores, or their layer mean broadcast to every head (heads share the same slots)."""
        if self.per_head:
            return probs_BKN
        return jnp.broadcast_to(jnp.mean(probs_BKN, axis=1, keepdims=True), probs_BKN.shape)

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        out_BTHD, q_BTHD, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
        rows_B1, valid_B1 = ev.last_rows(lengths_B, 1)
        score_BKT = self._score(ev.group_probs(q_BTHD, k_BTKD, rows_B1, valid_B1)[:, :, 0])
        kept = ev.keep_top(score_BKT, lengths_B, state["k"].shape[3], k_BTKD, v_BTKD)
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        out_BHD, state, step = ev.begin_decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope)
        drop_BK = ev.masked_argmin(self._score(step.probs_BKX), step.valid_BKX)
        return out_BHD, ev.finish_decode(state, layer, step, drop_BK)

    def stats(self, state, tokens_B):
        return ev.buffer_stats(state, tokens_B)


registry.register(registry.MethodSpec(
    name="tova", budgeted=True, defaults={"per_head": False}, legacy={"per_head": "tova_per_head"},
    build=lambda s, hparams: TOVACache(budget=s.budget, per_head=s.per_head),
    summary="drops the token the current query attends to least (Oren et al., 2024)"))
