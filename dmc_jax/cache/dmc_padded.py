"""The DMC cache, padded: per (layer, sequence, KV head) up to C slots of merged keys/values, a length per head.

State (stacked over layers):
    k, v      [L, B, K, C, Dh]  slot keys (after RoPE at the newest merged token's position) and values
    count     [L, B, K]         slots in use (1 + appends after the first token)
    overflow  [L, B, K]         decode appends that found no free slot (never silent: see `check`)
    lost      [L, B, K]         prompt slots beyond C at prefill (always an error)
    open slot                   mk, mv, z (unbounded window) or rk, rv, rw (window w): see dmc_common.py
Decode follows the spec's update (append opens a slot; accumulate re-averages and overwrites the last slot) and
attends over the slots in use. Prefill runs the parallel training form with hard decisions over the prompt and
builds the cache directly: token t's slot is the number of appends before it, and the value a slot keeps is the
partial accumulation at the last token of its run. With on_overflow='merge', a head whose slots are full merges
the new token into its last slot instead (counted in `overflow` too); prefill never merges: a prompt that needs
more slots than C is an error. The DMC math lives in dmc_common.py, shared with the paged cache.

Shape letters: L layers, B batch, K KV heads, C slots, W ring (window) size, T prompt time, H query heads, Dh.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from dmc_jax.cache import registry
from dmc_jax.cache.dmc_common import (OPEN_SLOT_KEYS, OVERFLOW, SIZING, SIZING_LEGACY, TRAINED, decode_decisions, init_open_slot, prefill_slots,
                                      rotate, update_open_slot, write_layer)
from dmc_jax.cache.overflow import check_buffer, check_sizing
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout, state_bytes
from dmc_jax.dmc.config import DMCConfig, from_section
from dmc_jax.model.attention import decode_attention
from dmc_jax.model.config import ModelConfig


def capacity_for(max_tokens: int, capacity: int, target_cr: float, margin: float) -> int:
    """Slots per head: `capacity` if set, else max_tokens / target_cr * margin (rounded up), at most max_tokens."""
    if capacity:
        return min(capacity, max_tokens)
    if target_cr:
        return min(max_tokens, max(1, math.ceil(max_tokens / target_cr * margin)))
    return max_tokens


@dataclasses.dataclass(frozen=True)
class DMCPaddedCache(RowOps):
    """DMC inference with a padded buffer of `capacity` slots per head (or derived from target_cr x margin)."""

    layout = StateLayout(kept=("overflow", "lost"))

    dmc: DMCConfig = DMCConfig()
    capacity: int = 0
    target_cr: float = 0.0
    margin: float = 1.25
    on_overflow: str = "error"
    name: str = "dmc"

    def __post_init__(self):
        check_sizing("dmc", "capacity", self.capacity, self.target_cr, self.margin, self.on_overflow, OVERFLOW)

    # ------------------------------------------------------------------------------------------------ state
    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        C = capacity_for(max_tokens, self.capacity, self.target_cr, self.margin)
        L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        state = {"k": jnp.zeros((L, batch, K, C, Dh), cfg.dtype), "v": jnp.zeros((L, batch, K, C, Dh), cfg.dtype),
                 "count": jnp.zeros((L, batch, K), jnp.int32), "overflow": jnp.zeros((L, batch, K), jnp.int32),
                 "lost": jnp.zeros((L, batch, K), jnp.int32)}
        state.update(init_open_slot(self.dmc, L, batch, K, Dh))
        return state

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        x = decode_decisions(self.dmc, q_BHD, k_BKD, v_BKD, positions_B)
        s = {name: state[name][layer] for name in ("count", "overflow", *OPEN_SLOT_KEYS) if name in state}
        B, K = x.merge_BK.shape
        C = state["k"].shape[3]
        overflow_BK = (s["count"] >= C) & ~x.merge_BK & ~x.first_BK  # an append with no free slot
        merge_BK = x.merge_BK | overflow_BK if self.on_overflow == "merge" else x.merge_BK
        count_BK = jnp.where(x.first_BK, 1, jnp.minimum(s["count"] + (~merge_BK).astype(jnp.int32), C))
        mk_BKD, mv_BKD, new = update_open_slot(self.dmc, s, merge_BK, x, positions_B)
        new.update(count=count_BK, overflow=s["overflow"] + overflow_BK.astype(jnp.int32))
        state = write_layer(state, layer, new)
        # Only the newest slot changes: a scatter of one row per head, in place in the carried buffer.
        b_BK, k_BK = jnp.meshgrid(jnp.arange(B), jnp.arange(K), indexing="ij")
        at = (layer, b_BK, k_BK, count_BK - 1)
        key_BKD = rotate(self.dmc, mk_BKD.astype(state["k"].dtype), positions_B, rope)
        state["k"] = state["k"].at[at].set(key_BKD)
        state["v"] = state["v"].at[at].set(mv_BKD.astype(state["v"].dtype))
        q_BHD = rotate(self.dmc, x.q_BHD, positions_B, rope)
        valid_BKC = jnp.arange(C)[None, None] < count_BK[..., None]
        out_BHD = decode_attention(q_BHD, state["k"][layer], state["v"][layer], valid_BKC)
        return out_BHD, state

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        p = prefill_slots(self.dmc, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope)
        B, T, K = p.slot_BTK.shape
        s_k, s_v = state["k"][layer], state["v"][layer]
        C = s_k.shape[2]
        # Tokens that do not close their run (slot -1) and prompt slots beyond C go out of range: dropped.
        slot_BTK = jnp.where(p.slot_BTK < 0, C, p.slot_BTK)
        b_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], slot_BTK.shape)
        kh_BTK = jnp.broadcast_to(jnp.arange(K)[None, None], slot_BTK.shape)
        new = {"k": s_k.at[b_BTK, kh_BTK, slot_BTK].set(p.khat_BTKD.astype(s_k.dtype), mode="drop"),
               "v": s_v.at[b_BTK, kh_BTK, slot_BTK].set(p.vhat_BTKD.astype(s_v.dtype), mode="drop"),
               "count": jnp.minimum(p.count_BK, C), "lost": jnp.maximum(p.count_BK - C, 0), **p.open_slot}
        return p.out_BTHD, write_layer(state, layer, new)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self, state, tokens_B):
        L, B, K, C, Dh = state["k"].shape
        per_slot = 2 * Dh * state["k"].dtype.itemsize
        kept_LBK = state["count"].astype(jnp.float32)
        return {"tokens_B": tokens_B, "kept_LBK": kept_LBK, "overflow_LBK": state["overflow"] + state["lost"],
                "bytes_allocated": state_bytes(state), "bytes_in_use": jnp.sum(state["count"]) * per_slot,
                "capacity": C}

    def check(self, state) -> None:
        """UserError naming the first (layer, head) that ran out of slots (decode overflow allowed with 'merge')."""
        check_buffer(state, "DMC cache", "slots for the prompt", "appends",
                     "raise cache.dmc.capacity or cache.dmc.margin, or lower cache.dmc.target_cr",
                     "cache.dmc.on_overflow='merge'", self.on_overflow == "merge")


registry.register(registry.MethodSpec(
    name="dmc", trained=TRAINED, sized_by_cr=True,
    defaults={"capacity": 0, **SIZING}, legacy={"capacity": "capacity", **SIZING_LEGACY},
    build=lambda s, hparams: DMCPaddedCache(from_section(hparams), capacity=s.capacity, target_cr=s.target_cr,
                                            margin=s.margin, on_overflow=s.on_overflow),
    summary="Dynamic Memory Compression, a padded buffer per head (Nawrot et al., ICML 2024)"))
