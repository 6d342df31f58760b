"""DMC cache numerics shared by the padded and the paged caches: one state machine, two storage layouts.

Both caches keep, per (layer, sequence, KV head), the open slot's running state next to their slot storage:
    unbounded window:  mk, mv [L, B, K, Dh] pre-RoPE running means (fp32), z [L, B, K] their weight
    window w:          rk, rv [L, B, K, W, Dh] the run's last w (pre-RoPE) entries, rw [L, B, K, W] their
                       importances (0 = empty), the entry of token t at ring index t % w
Decode: `decode_decisions` reads alpha/omega and zeroes the channel, `update_open_slot` re-averages (accumulate)
or restarts (append) the open slot and returns the mean the newest slot holds, `rotate` rotates it at the token's
position. Prefill: `prefill_slots` runs the parallel training form with hard decisions and says which slot each
prompt token closes. Storage (where a slot lives) is the caller's business.

Shape letters: L layers, B batch, K KV heads, W ring (window) size, T prompt time, H query heads, Dh head dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from dmc_jax.cache import registry
from dmc_jax.cache.protocol import RopeFn
from dmc_jax.cache.zeroed_channel import ZeroedChannel
from dmc_jax.dmc.accumulate import accumulate
from dmc_jax.dmc.attention import dmc_core
from dmc_jax.dmc.config import DMCConfig, default_section, from_section, validate_section
from dmc_jax.dmc.decisions import decisions, read_channel, zero_channel

OVERFLOW = ("error", "merge")

def _other_cache(section):
    """A DMC model served by another cache method: channel ch of every q and k head zeroed (DMC's attention with
    every decision 'append')."""
    dmc = from_section(section)
    return functools.partial(ZeroedChannel, channel=dmc.decision_channel, first_of_group=False, keys=True,
                             after_rope=dmc.zero_after_rope)


# What a DMC model carries (its `dmc` section: window, channel, offset, target CR, ...) and how it is trained; both
# DMC caches are served from it.
TRAINED = registry.TrainedMethod(
    section="dmc", defaults=lambda: default_section().to_dict(), validate=validate_section,
    objective="dmc_jax.dmc.objective:make", evaluate="dmc_jax.dmc.objective:eval_attention", serve_method="dmc_paged",
    other_cache=_other_cache)
# The fields both DMC caches share: the CR their buffers are sized for and what happens when one runs out of room.
SIZING = {"target_cr": 0.0, "margin": 1.25, "on_overflow": "error"}
SIZING_LEGACY = {name: name for name in SIZING}
OPEN_SLOT_KEYS = ("mk", "mv", "z", "rk", "rv", "rw")


def write_layer(state: dict, layer, values: dict) -> dict:
    """Writes per-layer slices (leading axis L dropped) at the traced `layer` index, in place in the carry."""
    new = dict(state)
    for name, x in values.items():
        new[name] = jax.lax.dynamic_update_slice(state[name], x[None].astype(state[name].dtype),
                                                 (layer,) + (0,) * (x.ndim))
    return new


def init_open_slot(dmc: DMCConfig, L: int, B: int, K: int, Dh: int) -> dict:
    """Zero open-slot state for the configured window (see the module docstring)."""
    if dmc.window is None:
        return {"mk": jnp.zeros((L, B, K, Dh), jnp.float32), "mv": jnp.zeros((L, B, K, Dh), jnp.float32),
                "z": jnp.zeros((L, B, K), jnp.float32)}
    W = dmc.window
    return {"rk": jnp.zeros((L, B, K, W, Dh), jnp.float32), "rv": jnp.zeros((L, B, K, W, Dh), jnp.float32),
            "rw": jnp.zeros((L, B, K, W), jnp.float32)}


class DecodeInputs(NamedTuple):
    """One decode token's DMC view: merge decisions, first-token flags, importances, q/k with channel ch zeroed."""

    merge_BK: jax.Array   # bool: accumulate into the open slot (never for a sequence's first token)
    first_BK: jax.Array   # bool: the sequence's first token (position 0): always appends, starts slot 0
    omega_BK: jax.Array   # fp32 importance
    q_BHD: jax.Array      # pre-RoPE, channel ch zeroed
    k_BKD: jax.Array      # pre-RoPE, channel ch zeroed, fp32
    v_BKD: jax.Array      # fp32


def decode_decisions(dmc: DMCConfig, q_BHD, k_BKD, v_BKD, positions_B) -> DecodeInputs:
    """Hard decisions and importances of one token per sequence (the first token of a sequence always appends)."""
    dmc = dmc.replace(mode="hard")
    a_B1K, omega_B1K, q_B1HD, k_B1KD = read_channel(q_BHD[:, None], k_BKD[:, None], dmc)
    first_B = positions_B == 0
    alpha_BK = jax.lax.stop_gradient(decisions(a_B1K, first_B[:, None], dmc, None)[0][:, 0])
    merge_BK = alpha_BK > 0.5
    return DecodeInputs(merge_BK, jnp.broadcast_to(first_B[:, None], merge_BK.shape), omega_B1K[:, 0],
                        q_B1HD[:, 0], k_B1KD[:, 0].astype(jnp.float32), v_BKD.astype(jnp.float32))


def update_open_slot(dmc: DMCConfig, s: dict, merge_BK, x: DecodeInputs, positions_B):
    """(mk_BKD, mv_BKD, new open-slot state): the spec's update of one layer's open slots (s: that layer's slices).

    merge_BK is the final decision (the caller may have forced merges where no slot was free).
    """
    omega_BK, k_BKD, v_BKD = x.omega_BK, x.k_BKD, x.v_BKD
    if dmc.window is None:
        z_BK = jnp.where(merge_BK, s["z"] + omega_BK, omega_BK)
        r_BK1 = (omega_BK / z_BK)[..., None]
        m_BK1 = merge_BK[..., None]
        mk_BKD = jnp.where(m_BK1, (1.0 - r_BK1) * s["mk"] + r_BK1 * k_BKD, k_BKD)
        mv_BKD = jnp.where(m_BK1, (1.0 - r_BK1) * s["mv"] + r_BK1 * v_BKD, v_BKD)
        return mk_BKD, mv_BKD, {"z": z_BK, "mk": mk_BKD, "mv": mv_BKD}
    W = dmc.window
    at_B1W = jax.nn.one_hot(positions_B % W, W, dtype=jnp.float32)[:, None, :]
    rw_BKW = jnp.where(merge_BK[..., None], s["rw"], 0.0) * (1.0 - at_B1W) + omega_BK[..., None] * at_B1W
    rk_BKWD = s["rk"] * (1.0 - at_B1W)[..., None] + k_BKD[:, :, None] * at_B1W[..., None]
    rv_BKWD = s["rv"] * (1.0 - at_B1W)[..., None] + v_BKD[:, :, None] * at_B1W[..., None]
    norm_BK1 = rw_BKW.sum(-1)[..., None]
    mk_BKD = jnp.einsum("bkw,bkwd->bkd", rw_BKW, rk_BKWD) / norm_BK1
    mv_BKD = jnp.einsum("bkw,bkwd->bkd", rw_BKW, rv_BKWD) / norm_BK1
    return mk_BKD, mv_BKD, {"rw": rw_BKW, "rk": rk_BKWD, "rv": rv_BKWD}


def rotate(dmc: DMCConfig, x_BND, positions_B, rope: RopeFn):
    """RoPE of one token per sequence (keys or queries, [B, N, Dh]), channel ch zeroed again when configured."""
    out_BND = rope(x_BND[:, None], positions_B[:, None])[:, 0]
    return zero_channel(out_BND, dmc.channel(x_BND.shape[-1])) if dmc.zero_after_rope else out_BND


class PrefillSlots(NamedTuple):
    """What the parallel form of a prompt leaves in the cache (per sequence and KV head)."""

    out_BTHD: jax.Array   # causal DMC attention output of every prompt token
    khat_BTKD: jax.Array  # the slot key (RoPE'd partial accumulation) after each token
    vhat_BTKD: jax.Array  # the slot value after each token
    slot_BTK: jax.Array   # int32 slot a token closes (its run's last token, or the prompt's), -1 otherwise
    count_BK: jax.Array   # int32 slots the prompt needs
    open_slot: dict       # the open slot's state after the last prompt token ([B, K, ...] leaves)


def prefill_slots(dmc: DMCConfig, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn) -> PrefillSlots:
    """Parallel hard-decision DMC over right-padded prompts; token t's slot = appends before it (see PrefillSlots)."""
    B, T, _, Dh = q_BTHD.shape
    ch = dmc.channel(Dh)
    dmc = dmc.replace(mode="hard")
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
    next_alpha_BTK = jnp.concatenate([alpha_BTK[:, 1:], jnp.zeros_like(alpha_BTK[:, :1])], axis=1)
    last_BT1 = (t_T[None] == lengths_B[:, None] - 1)[..., None]
    closes_BTK = real_BT1 & ((next_alpha_BTK < 0.5) | last_BT1)  # the last token of its run (or of the prompt)
    slot_BTK = jnp.where(closes_BTK, jnp.cumsum(appends_BTK.astype(jnp.int32), axis=1) - 1, -1)
    count_BK = jnp.sum(appends_BTK, axis=1).astype(jnp.int32)
    last_B = lengths_B - 1
    if dmc.window is None:
        mk_BTKD, mv_BTKD = accumulate(alpha_BTK, omega_BTK, (k_BTKD, v_BTKD), None)
        z_full_BTK = jax.lax.associative_scan(lambda l, r: (l[0] * r[0], r[0] * l[1] + r[1]),
                                              (alpha_BTK, omega_BTK), axis=1)[1]
        take = lambda x: jnp.take_along_axis(x, last_B.reshape((B, 1) + (1,) * (x.ndim - 2)), axis=1)[:, 0]
        open_slot = {"mk": take(mk_BTKD), "mv": take(mv_BTKD), "z": take(z_full_BTK)}
    else:
        W = dmc.window
        # The open run's last <= W tokens: positions last - r for r < W, inside the run (after its append).
        run_start_BK = jnp.max(jnp.where(appends_BTK, t_T[None, :, None], 0), axis=1)
        pos_BR = last_B[:, None] - jnp.arange(W)[None]
        gather = lambda x: jnp.take_along_axis(x, jnp.maximum(pos_BR, 0).reshape(pos_BR.shape + (1,) * (x.ndim - 2)),
                                               axis=1)  # [B, R, K, ...]
        in_run_BRK = (pos_BR[..., None] >= run_start_BK[:, None]) & (pos_BR[..., None] >= 0)
        ring_BRW = jax.nn.one_hot(jnp.maximum(pos_BR, 0) % W, W)  # where entry r sits in the ring
        w_BRK = jnp.where(in_run_BRK, gather(omega_BTK), 0.0)
        open_slot = {
            "rw": jnp.einsum("brk,brw->bkw", w_BRK, ring_BRW),
            "rk": jnp.einsum("brkd,brk,brw->bkwd", gather(k_BTKD.astype(jnp.float32)), in_run_BRK, ring_BRW),
            "rv": jnp.einsum("brkd,brk,brw->bkwd", gather(v_BTKD.astype(jnp.float32)), in_run_BRK, ring_BRW),
        }
    return PrefillSlots(out_BTHD, khat_BTKD, vhat_BTKD, slot_BTK, count_BK, open_slot)
