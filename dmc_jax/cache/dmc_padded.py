"""The DMC cache, padded: per (layer, sequence, KV head) up to C slots of merged keys/values, a length per head.

State (stacked over layers):
    k, v      [L, B, K, C, Dh]  slot keys (after RoPE at the newest merged token's position) and values
    count     [L, B, K]         slots in use (1 + appends after the first token)
    overflow  [L, B, K]         decode appends that found no free slot (never silent: see `check`)
    lost      [L, B, K]         prompt slots beyond C at prefill (always an error)
    open slot, unbounded window:  mk, mv [L, B, K, Dh] pre-RoPE running means (fp32), z [L, B, K] their weight
    open slot, window w:          rk, rv [L, B, K, w, Dh] the run's last w (pre-RoPE) entries, rw [L, B, K, w]
                                  their importances (0 = empty), entry of token t at ring index t % w
Decode follows the spec's update (append opens a slot; accumulate re-averages and overwrites the last slot) and
attends over the slots in use. Prefill runs the parallel training form with hard decisions over the prompt and
builds the cache directly: token t's slot is the number of appends before it, and the value a slot keeps is the
partial accumulation at the last token of its run. With on_overflow='merge', a head whose slots are full merges
the new token into its last slot instead (counted in `overflow` too); prefill never merges: a prompt that needs
more slots than C is an error.

Shape letters: L layers, B batch, K KV heads, C slots, W ring (window) size, T prompt time, H query heads, Dh.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache.protocol import RopeFn, state_bytes
from dmc_jax.dmc.accumulate import accumulate
from dmc_jax.dmc.attention import dmc_core
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.dmc.decisions import decisions, read_channel, zero_channel
from dmc_jax.errors import UserError
from dmc_jax.model.attention import decode_attention
from dmc_jax.model.config import ModelConfig

OVERFLOW = ("error", "merge")


def capacity_for(max_tokens: int, capacity: int, target_cr: float, margin: float) -> int:
    """Slots per head: `capacity` if set, else max_tokens / target_cr * margin (rounded up), at most max_tokens."""
    if capacity:
        return min(capacity, max_tokens)
    if target_cr:
        return min(max_tokens, max(1, math.ceil(max_tokens / target_cr * margin)))
    return max_tokens


def _write(state: dict, layer, values: dict) -> dict:
    new = dict(state)
    for name, x in values.items():
        new[name] = jax.lax.dynamic_update_slice(state[name], x[None].astype(state[name].dtype),
                                                 (layer,) + (0,) * (x.ndim))
    return new


@dataclasses.dataclass(frozen=True)
class DMCPaddedCache:
    """DMC inference with a padded buffer of `capacity` slots per head (or derived from target_cr x margin)."""

    dmc: DMCConfig = DMCConfig()
    capacity: int = 0
    target_cr: float = 0.0
    margin: float = 1.25
    on_overflow: str = "error"
    name: str = "dmc"

    def __post_init__(self):
        if self.on_overflow not in OVERFLOW:
            raise UserError(f"cache.on_overflow must be one of {', '.join(OVERFLOW)}; got {self.on_overflow!r}")
        if self.capacity < 0 or self.target_cr < 0 or (self.target_cr and self.target_cr < 1):
            raise UserError("cache.capacity must be >= 0 and cache.target_cr 0 (off) or >= 1")
        if self.margin < 1:
            raise UserError(f"cache.margin must be >= 1; got {self.margin}")

    # ------------------------------------------------------------------------------------------------ state
    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        C = capacity_for(max_tokens, self.capacity, self.target_cr, self.margin)
        L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        state = {"k": jnp.zeros((L, batch, K, C, Dh), cfg.dtype), "v": jnp.zeros((L, batch, K, C, Dh), cfg.dtype),
                 "count": jnp.zeros((L, batch, K), jnp.int32), "overflow": jnp.zeros((L, batch, K), jnp.int32),
                 "lost": jnp.zeros((L, batch, K), jnp.int32)}
        if self.dmc.window is None:
            state.update(mk=jnp.zeros((L, batch, K, Dh), jnp.float32), mv=jnp.zeros((L, batch, K, Dh), jnp.float32),
                         z=jnp.zeros((L, batch, K), jnp.float32))
        else:
            W = self.dmc.window
            state.update(rk=jnp.zeros((L, batch, K, W, Dh), jnp.float32),
                         rv=jnp.zeros((L, batch, K, W, Dh), jnp.float32), rw=jnp.zeros((L, batch, K, W), jnp.float32))
        return state

    def _rotate(self, x_BKD, positions_B, rope: RopeFn, ch: int):
        out_BKD = rope(x_BKD[:, None], positions_B[:, None])[:, 0]
        return zero_channel(out_BKD, ch) if self.dmc.zero_after_rope else out_BKD

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        Dh = q_BHD.shape[-1]
        ch = self.dmc.channel(Dh)
        dmc = self.dmc.replace(mode="hard")
        a_B1K, omega_B1K, q_B1HD, k_B1KD = read_channel(q_BHD[:, None], k_BKD[:, None], dmc)
        alpha_BK = jax.lax.stop_gradient(decisions(a_B1K, (positions_B == 0)[:, None], dmc, None)[0][:, 0]) > 0.5
        omega_BK, k_BKD = omega_B1K[:, 0], k_B1KD[:, 0].astype(jnp.float32)
        v_BKD = v_BKD.astype(jnp.float32)
        s = {name: x[layer] for name, x in state.items()}
        C = s["k"].shape[2]
        full_BK = s["count"] >= C
        first_BK = jnp.broadcast_to((positions_B == 0)[:, None], alpha_BK.shape)
        overflow_BK = full_BK & ~alpha_BK & ~first_BK  # an append with no free slot
        if self.on_overflow == "merge":
            alpha_BK = alpha_BK | overflow_BK
        count_BK = jnp.where(first_BK, 1, jnp.minimum(s["count"] + (~alpha_BK).astype(jnp.int32), C))
        new = {"count": count_BK, "overflow": s["overflow"] + overflow_BK.astype(jnp.int32)}
        if self.dmc.window is None:
            z_BK = jnp.where(alpha_BK, s["z"] + omega_BK, omega_BK)
            r_BK1 = (omega_BK / z_BK)[..., None]
            a_BK1 = alpha_BK[..., None]
            mk_BKD = jnp.where(a_BK1, (1.0 - r_BK1) * s["mk"] + r_BK1 * k_BKD, k_BKD)
            mv_BKD = jnp.where(a_BK1, (1.0 - r_BK1) * s["mv"] + r_BK1 * v_BKD, v_BKD)
            new.update(z=z_BK, mk=mk_BKD, mv=mv_BKD)
        else:
            W = self.dmc.window
            at_W = jax.nn.one_hot(positions_B % W, W, dtype=jnp.float32)[:, None, :]  # [B, 1, W]
            rw_BKW = jnp.where(alpha_BK[..., None], s["rw"], 0.0) * (1.0 - at_W) + omega_BK[..., None] * at_W
            rk_BKWD = s["rk"] * (1.0 - at_W)[..., None] + k_BKD[:, :, None] * at_W[..., None]
            rv_BKWD = s["rv"] * (1.0 - at_W)[..., None] + v_BKD[:, :, None] * at_W[..., None]
            norm_BK1 = rw_BKW.sum(-1)[..., None]
            mk_BKD = jnp.einsum("bkw,bkwd->bkd", rw_BKW, rk_BKWD) / norm_BK1
            mv_BKD = jnp.einsum("bkw,bkwd->bkd", rw_BKW, rv_BKWD) / norm_BK1
            new.update(rw=rw_BKW, rk=rk_BKWD, rv=rv_BKWD)
        slot_BK = count_BK - 1
        onehot_BKC1 = jax.nn.one_hot(slot_BK, C, dtype=bool)[..., None]
        key_BKD = self._rotate(mk_BKD.astype(s["k"].dtype), positions_B, rope, ch)
        new["k"] = jnp.where(onehot_BKC1, key_BKD[:, :, None], s["k"])
        new["v"] = jnp.where(onehot_BKC1, mv_BKD.astype(s["v"].dtype)[:, :, None], s["v"])
        q_BHD = rope(q_B1HD, positions_B[:, None])[:, 0]
        if self.dmc.zero_after_rope:
            q_BHD = zero_channel(q_BHD, ch)
        valid_BKC = jnp.arange(C)[None, None] < count_BK[..., None]
        out_BHD = decode_attention(q_BHD, new["k"], new["v"], valid_BKC)
        return out_BHD, _write(state, layer, new)

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        B, T, _, Dh = q_BTHD.shape
        ch = self.dmc.channel(Dh)
        dmc = self.dmc.replace(mode="hard")
        a_BTK, omega_BTK, q_BTHD, k_BTKD = read_channel(q_BTHD, k_BTKD, dmc)
        t_T = jnp.arange(T, dtype=jnp.int32)
        starts_BT = jnp.broadcast_to(t_T == 0, (B, T))
        alpha_BTK, _, z_BTK = decisions(a_BTK, starts_BT, dmc, None)
        alpha_BTK = jax.lax.stop_gradient(alpha_BTK)
        positions_BT = jnp.broadcast_to(t_T, (B, T))
        out_BTHD, khat_BTKD, vhat_BTKD = dmc_core(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, z_BTK, omega_BTK, positions_BT,
                                                  None, rope, ch, dmc, return_slots=True)
        real_BT1 = (t_T[None] < lengths_B[:, None])[..., None]
        appends_BTK = jnp.where(real_BT1, alpha_BTK < 0.5, False)
        slot_BTK = jnp.cumsum(appends_BTK.astype(jnp.int32), axis=1) - 1
        next_alpha_BTK = jnp.concatenate([alpha_BTK[:, 1:], jnp.zeros_like(alpha_BTK[:, :1])], axis=1)
        last_BT1 = (t_T[None] == lengths_B[:, None] - 1)[..., None]
        closes_BTK = real_BT1 & ((next_alpha_BTK < 0.5) | last_BT1)  # the last token of its run (or of the prompt)
        s = {name: x[layer] for name, x in state.items()}
        C = s["k"].shape[2]
        count_BK = jnp.sum(appends_BTK, axis=1).astype(jnp.int32)
        # Slots of tokens that do not close their run go out of range and are dropped by the scatter.
        slot_BTK = jnp.where(closes_BTK, slot_BTK, C)
        b_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], slot_BTK.shape)
        kh_BTK = jnp.broadcast_to(jnp.arange(k_BTKD.shape[2])[None, None], slot_BTK.shape)
        new = {"k": s["k"].at[b_BTK, kh_BTK, slot_BTK].set(khat_BTKD.astype(s["k"].dtype), mode="drop"),
               "v": s["v"].at[b_BTK, kh_BTK, slot_BTK].set(vhat_BTKD.astype(s["v"].dtype), mode="drop"),
               "count": jnp.minimum(count_BK, C), "lost": jnp.maximum(count_BK - C, 0)}
        last_B = lengths_B - 1
        if self.dmc.window is None:
            mk_BTKD, mv_BTKD = accumulate(alpha_BTK, omega_BTK, (k_BTKD, v_BTKD), None)
            z_full_BTK = jax.lax.associative_scan(lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]),
                                                  (alpha_BTK, omega_BTK), axis=1)[1]
            take = lambda x: jnp.take_along_axis(x, last_B.reshape((B, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
            new.update(mk=take(mk_BTKD), mv=take(mv_BTKD), z=take(z_full_BTK))
        else:
            W = self.dmc.window
            # The open run's last <= W tokens: positions last - r for r < W, inside the run (after its append).
            run_start_BK = jnp.max(jnp.where(appends_BTK, t_T[None, :, None], 0), axis=1)
            pos_BR = last_B[:, None] - jnp.arange(W)[None]
            gather = lambda x: jnp.take_along_axis(x, jnp.maximum(pos_BR, 0).reshape(pos_BR.shape + (1,) * (x.ndim - 2)),
                                                   axis=1)  # [B, R, K, ...]
            in_run_BRK = (pos_BR[..., None] >= run_start_BK[:, None]) & (pos_BR[..., None] >= 0)
            ring_BRW = jax.nn.one_hot(jnp.maximum(pos_BR, 0) % W, W)  # where entry r sits in the ring
            w_BRK = jnp.where(in_run_BRK, gather(omega_BTK), 0.0)
            new["rw"] = jnp.einsum("brk,brw->bkw", w_BRK, ring_BRW)
            new["rk"] = jnp.einsum("brkd,brk,brw->bkwd", gather(k_BTKD.astype(jnp.float32)), in_run_BRK, ring_BRW)
            new["rv"] = jnp.einsum("brkd,brk,brw->bkwd", gather(v_BTKD.astype(jnp.float32)), in_run_BRK, ring_BRW)
        return out_BTHD, _write(state, layer, new)

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
        C = state["k"].shape[3]
        lost_LBK = np.asarray(state["lost"])
        if lost_LBK.any():
            l, b, k = (int(i) for i in np.argwhere(lost_LBK)[0])
            raise UserError(f"DMC cache overflow at prefill: layer {l}, KV head {k} (sequence {b}) needs "
                            f"{C + int(lost_LBK[l, b, k])} slots for the prompt, capacity is {C}; raise "
                            f"cache.capacity (or cache.margin / lower cache.target_cr)")
        overflow_LBK = np.asarray(state["overflow"])
        if self.on_overflow == "error" and overflow_LBK.any():
            l, b, k = (int(i) for i in np.argwhere(overflow_LBK)[0])
            raise UserError(f"DMC cache overflow: layer {l}, KV head {k} (sequence {b}) needed more than "
                            f"{C} slots ({int(overflow_LBK.sum())} appends found no slot in all); raise "
                            f"cache.capacity or cache.margin, or set cache.on_overflow='merge'")
