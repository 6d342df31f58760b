"""StreamingLLM (Xiao et al. 2023): the first n_sink tokens (attention sinks) and the most recent ones.

Per (sequence, KV head) a buffer of C = budget slots: after prefill the first n_sink prompt tokens and the last
C - n_sink; while decoding, a full buffer drops its oldest non-sink token. Keys keep the RoPE of their original
positions (the paper re-numbers positions inside the cache to run past the trained context; within the model's
context, as here, original positions are what the model was trained on).

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
class StreamingLLMCache(RowOps):
    """Attention sinks + a sliding window of the most recent tokens."""

    layout = ev.LAYOUT

    budget: int = 256   # slots per layer, sequence and KV head
    n_sink: int = 4     # the paper's four initial tokens
    name: str = "streaming_llm"

    def __post_init__(self):
        require(self.n_sink >= 0, f"cache.streaming_llm.n_sink must be >= 0; got {self.n_sink}")
        require(self.budget > self.n_sink, f"cache.budget ({self.budget}) must exceed cache.streaming_llm.n_sink "
                                           f"({self.n_sink}) to leave room for recent tokens")

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        return ev.init_buffers(cfg, batch, min(self.budget, max_tokens))

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        out_BTHD, _, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
        B, T, K = k_BTKD.shape[:3]
        t_T = jnp.arange(T)
        # The most recent tokens rank highest; sinks above all.
        priority_BKT = jnp.broadcast_to(jnp.where(t_T < self.n_sink, ev.INF, t_T.astype(jnp.float32)), (B, K, T))
        kept = ev.keep_top(priority_BKT, lengths_B, state["k"].shape[3], k_BTKD, v_BTKD)
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        out_BHD, state, step = ev.begin_decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope)
        drop_BK = ev.masked_argmin(step.pos_BKX, step.valid_BKX & (step.pos_BKX >= self.n_sink))
        return out_BHD, ev.finish_decode(state, layer, step, drop_BK)

    def stats(self, state, tokens_B):
        return ev.buffer_stats(state, tokens_B)


registry.register(registry.MethodSpec(
    name="streaming_llm", budgeted=True, defaults={"n_sink": 4}, legacy={"n_sink": "n_sink"},
    build=lambda s, hparams: StreamingLLMCache(budget=s.budget, n_sink=s.n_sink),
    summary="attention sinks + a sliding window (Xiao et al., ICLR 2024)"))
