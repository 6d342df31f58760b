"""Shared numerics of the eviction policies: a fixed-capacity buffer per KV head, its attention, top-k keeping.

Every eviction policy keeps, per layer, sequence and KV head, C slots (C = the budget, never the sequence
length). A state is a dict of arrays stacked over layers:
    k, v    [L, B, K, C, Dh]  keys after RoPE (at their original positions) and values
    pos     [L, B, K, C]      original position of the token in each slot, -1 where the slot is empty
    valid   [L, B, K, C]      the validity mask: True where a slot holds a token
plus each policy's per-slot statistics, also [L, B, K, C] (H2O's accumulated attention, CORM's counters, ...).

Prefill attends over the whole prompt exactly as the dense cache does, then keeps the C best tokens of each
(sequence, KV head) by a policy's priority (`keep_top`); kept tokens sit in slots 0.. in position order. Decode
rotates the new token, writes it into the first empty slot when there is one, attends over the slots plus, when
the buffer is full, the new token held outside it (C + 1 candidates, as in the papers' code), and the policy
names the candidate to drop: the new token then takes the dropped token's slot (`begin_decode`/`finish_decode`).
While nothing is evicted the attention is the dense cache's computation on the same slots.

Scores are attention probabilities in fp32, averaged over the G query heads of each KV head (GQA).

Shape letters: L layers, B batch, K KV heads, G query heads per KV head, H = K * G, C slots, X = C + 1 decode
candidates (the slots, then the new token), T prompt time, Q selected query rows, Dh head dim.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import jax
import jax.numpy as jnp

from dmc_jax.cache.protocol import RopeFn, StateLayout, state_bytes
from dmc_jax.model.attention import NEG_INF, causal_mask, decode_attention, grouped_attention
from dmc_jax.model.config import ModelConfig

INF = float("inf")
# An empty row: no valid slot, positions -1 (a policy with per-slot statistics adds their empty values).
LAYOUT = StateLayout(fills={"pos": -1, "valid": False})


def init_buffers(cfg: ModelConfig, batch: int, capacity: int, extras: Dict[str, tuple] = ()) -> dict:
    """Empty state with `capacity` slots per (layer, sequence, KV head); extras: name -> (dtype, fill value)."""
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, capacity)
    state = {"k": jnp.zeros(shape + (cfg.head_dim,), cfg.dtype), "v": jnp.zeros(shape + (cfg.head_dim,), cfg.dtype),
             "pos": jnp.full(shape, -1, jnp.int32), "valid": jnp.zeros(shape, bool)}
    for name, (dtype, fill) in dict(extras).items():
        state[name] = jnp.full(shape, fill, dtype)
    return state


def read_layer(state: dict, layer: jax.Array) -> dict:
    return {name: x[layer] for name, x in state.items()}


def write_layer(state: dict, layer: jax.Array, values: dict) -> dict:
    """Writes per-layer slices [B, K, C, ...] in place (dynamic_update_slice at the traced layer index)."""
    new = dict(state)
    for name, x in values.items():
        start = (layer,) + (0,) * (state[name].ndim - 1)
        new[name] = jax.lax.dynamic_update_slice(state[name], x[None].astype(state[name].dtype), start)
    return new


# ---------------------------------------------------------------------------------------------------- prefill


def prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope: RopeFn):
    """RoPE at positions 0..T-1 and causal attention over the prompt (the dense cache's computation).

    Returns out_BTHD and the rotated q_BTHD, k_BTKD.
    """
    B, T = q_BTHD.shape[:2]
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    q_BTHD, k_BTKD = rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT)
    out_BTHD = grouped_attention(q_BTHD, k_BTKD, v_BTKD, causal_mask(positions_BT, positions_BT))
    return out_BTHD, q_BTHD, k_BTKD


def last_rows(lengths_B: jax.Array, n: int):
    """Indices [B, n] of the last n real prompt positions (the window) and whether each exists (>= 0)."""
    rows_BQ = lengths_B[:, None] - n + jnp.arange(n, dtype=jnp.int32)[None]
    return jnp.maximum(rows_BQ, 0), rows_BQ >= 0


def group_probs(q_BTHD, k_BTKD, rows_BQ, rows_valid_BQ) -> jax.Array:
    """Causal attention probabilities [B, K, Q, T] of the prompt queries at rows_BQ, averaged over each group.

    Rows that are not valid are zero. fp32.
    """
    B, T, H, Dh = q_BTHD.shape
    K = k_BTKD.shape[2]
    q_BQHD = jnp.take_along_axis(q_BTHD, rows_BQ[:, :, None, None], axis=1)
    q_BQKGD = q_BQHD.reshape(B, -1, K, H // K, Dh)
    scores_BKGQT = jnp.einsum("bqkgd,btkd->bkgqt", q_BQKGD, k_BTKD,
                              preferred_element_type=jnp.float32) * (Dh ** -0.5)
    mask_BQT = (jnp.arange(T)[None, None, :] <= rows_BQ[:, :, None]) & rows_valid_BQ[:, :, None]
    scores_BKGQT = jnp.where(mask_BQT[:, None, None], scores_BKGQT, NEG_INF)
    probs_BKGQT = jax.nn.softmax(scores_BKGQT, axis=-1)
    probs_BKGQT = jnp.where(rows_valid_BQ[:, None, None, :, None], probs_BKGQT, 0.0)
    return jnp.mean(probs_BKGQT, axis=2)


def column_sums(q_BTHD, k_BTKD, lengths_B, chunk: int = 256) -> jax.Array:
    """Attention each prompt key receives from all real prompt queries [B, K, T], fp32: H2O's accumulated score.

    Equals jnp.sum(group_probs(q, k, every row, rows < lengths), axis=2), computed `chunk` query rows at a time
    (a scan), so it holds [B, K, G, chunk, T] scores instead of [B, K, G, T, T]: ~5x faster at 2,048 tokens on
    the CPU and 1/(T/chunk) of the memory.
    """
    B, T, H, Dh = q_BTHD.shape
    K = k_BTKD.shape[2]
    G = H // K
    C = min(chunk, T)
    n = -(-T // C)
    q_BTHD = jnp.pad(q_BTHD, [(0, 0), (0, n * C - T), (0, 0), (0, 0)])
    q_NBKGCD = jnp.transpose(q_BTHD.reshape(B, n, C, K, G, Dh), (1, 0, 3, 4, 2, 5))
    k_BKTD = jnp.swapaxes(k_BTKD, 1, 2)

    def add_chunk(acc_BKT, xs):
        q_BKGCD, first = xs
        rows_C = first + jnp.arange(C, dtype=jnp.int32)
        scores_BKGCT = jnp.einsum("bkgcd,bktd->bkgct", q_BKGCD, k_BKTD,
                                  preferred_element_type=jnp.float32) * (Dh ** -0.5)
        real_BC = rows_C[None] < lengths_B[:, None]
        mask_BCT = (jnp.arange(T)[None, None, :] <= rows_C[None, :, None]) & real_BC[:, :, None]
        scores_BKGCT = jnp.where(mask_BCT[:, None, None], scores_BKGCT, NEG_INF)
        probs_BKGCT = jax.nn.softmax(scores_BKGCT, axis=-1)
        probs_BKGCT = jnp.where(real_BC[:, None, None, :, None], probs_BKGCT, 0.0)
        return acc_BKT + jnp.sum(probs_BKGCT, axis=(2, 3)), None

    firsts_N = jnp.arange(n, dtype=jnp.int32) * C
    acc_BKT, _ = jax.lax.scan(add_chunk, jnp.zeros((B, K, T), jnp.float32), (q_NBKGCD, firsts_N))
    return acc_BKT / G


def keep_top(priority_BKT, lengths_B, capacity: int, k_BTKD, v_BTKD, stats_BKT: Dict[str, jax.Array] = ()):
    """The per-layer buffer [B, K, C, ...] holding the `capacity` highest-priority real tokens of each head.

    Priority -inf means never kept (padding is forced to -inf); ties keep the earlier position. Kept tokens go
    to slots 0.. in position order; stats_BKT (per-token statistics) are gathered alongside.
    """
    B, K, T = priority_BKT.shape
    real_BT = jnp.arange(T)[None] < lengths_B[:, None]
    priority_BKT = jnp.where(real_BT[:, None], priority_BKT.astype(jnp.float32), -INF)
    n = min(capacity, T)
    top_BKN, idx_BKN = jax.lax.top_k(priority_BKT, n)
    idx_BKN = jnp.sort(jnp.where(top_BKN > -INF, idx_BKN, T), axis=-1)  # kept first, in position order
    kept_BKN = idx_BKN < T
    idx_BKN = jnp.where(kept_BKN, idx_BKN, 0)

    def gather(x_BKT, fill):
        out = jnp.take_along_axis(x_BKT, idx_BKN.reshape(idx_BKN.shape + (1,) * (x_BKT.ndim - 3)), axis=2)
        out = jnp.where(kept_BKN.reshape(kept_BKN.shape + (1,) * (x_BKT.ndim - 3)), out, fill)
        pad = [(0, 0)] * out.ndim
        pad[2] = (0, capacity - n)
        return jnp.pad(out, pad, constant_values=fill)

    out = {"k": gather(jnp.swapaxes(k_BTKD, 1, 2), 0), "v": gather(jnp.swapaxes(v_BTKD, 1, 2), 0),
           "pos": gather(jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, K, T)), -1),
           "valid": gather(jnp.ones((B, K, T), bool), False)}
    for name, x_BKT in dict(stats_BKT).items():
        out[name] = gather(x_BKT, 0)
    return out


def avg_pool(x_BKT: jax.Array, kernel: int) -> jax.Array:
    """1-D average pooling along T, stride 1, zero padding of kernel // 2 counted in the mean (odd kernel)."""
    half = kernel // 2
    T = x_BKT.shape[-1]
    padded = jnp.pad(x_BKT, [(0, 0), (0, 0), (half, half)])
    return sum(padded[..., i:i + T] for i in range(kernel)) / kernel


# ----------------------------------------------------------------------------------------------------- decode


class Step(NamedTuple):
    """One decode step as a policy sees it; X = C + 1 candidates, the last one the new token held outside."""

    probs_BKGX: jax.Array  # attention of each query head over the candidates (fp32)
    pos_BKX: jax.Array     # original positions of the candidates (-1 = empty slot)
    valid_BKX: jax.Array   # candidates that exist (column C: only when the buffer was full)
    full_BK: jax.Array     # the buffer was full before this token: the policy must name a candidate to drop
    k_BKD: jax.Array       # the new token's rotated key and its value
    v_BKD: jax.Array
    positions_B: jax.Array

    @property
    def probs_BKX(self) -> jax.Array:
        """Scores under GQA: mean over the query heads of each KV head."""
        return jnp.mean(self.probs_BKGX, axis=2)


def _put(state: dict, layer, slot_BK, values: Dict[str, jax.Array]) -> dict:
    """Scatters one entry per (sequence, head) at slot_BK of `layer`; slot C (out of range) writes nothing."""
    B, K = slot_BK.shape
    b_B1, k_1K = jnp.arange(B)[:, None], jnp.arange(K)[None, :]
    new = dict(state)
    for name, x in values.items():
        new[name] = state[name].at[layer, b_B1, k_1K, slot_BK].set(x.astype(state[name].dtype), mode="drop")
    return new


def attend_with_new(q_BHD, k_BKCD, v_BKCD, valid_BKC, k_new_BKD, v_new_BKD, outside_BK):
    """Attention over the slots plus, where outside_BK, the new token held outside the buffer.

    Returns out_BHD and probs_BKGX. Where outside_BK is False the output is exactly decode_attention over the
    slots; otherwise the new token joins the softmax through the slots' log-sum-exp (no second pass over V).
    """
    B, H, Dh = q_BHD.shape
    K = k_BKCD.shape[1]
    G = H // K
    out_BKGD = decode_attention(q_BHD, k_BKCD, v_BKCD, valid_BKC).reshape(B, K, G, Dh)
    q_BKGD = q_BHD.reshape(B, K, G, Dh)
    scores_BKGC = jnp.einsum("bkgd,bksd->bkgs", q_BKGD, k_BKCD, preferred_element_type=jnp.float32) * (Dh ** -0.5)
    scores_BKGC = jnp.where(valid_BKC[:, :, None], scores_BKGC, NEG_INF)
    lse_BKG = jax.nn.logsumexp(scores_BKGC, axis=-1)
    new_BKG = jnp.einsum("bkgd,bkd->bkg", q_BKGD, k_new_BKD, preferred_element_type=jnp.float32) * (Dh ** -0.5)
    outside_BK1 = outside_BK[:, :, None]
    w_new_BKG = jnp.where(outside_BK1, jax.nn.sigmoid(new_BKG - lse_BKG), 0.0)
    w_old_BKG = jnp.where(outside_BK1, jax.nn.sigmoid(lse_BKG - new_BKG), 1.0)
    probs_BKGX = jnp.concatenate([jnp.exp(scores_BKGC - lse_BKG[..., None]) * w_old_BKG[..., None],
                                  w_new_BKG[..., None]], axis=-1)
    merged_BKGD = (out_BKGD.astype(jnp.float32) * w_old_BKG[..., None]
                   + v_new_BKD[:, :, None].astype(jnp.float32) * w_new_BKG[..., None])
    out_BKGD = jnp.where(outside_BK1[..., None], merged_BKGD.astype(out_BKGD.dtype), out_BKGD)
    return out_BKGD.reshape(B, H, Dh), probs_BKGX


def begin_decode(state: dict, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn, fresh: Dict[str, float] = ()):
    """Rotates the new token, stores it in the first empty slot if any, attends; returns (out_BHD, state, Step).

    `fresh` gives the initial statistics of a newly stored token (name -> value).
    """
    q_BHD = rope(q_BHD[:, None], positions_B[:, None])[:, 0]
    k_BKD = rope(k_BKD[:, None], positions_B[:, None])[:, 0]
    B, K = k_BKD.shape[:2]
    valid_BKC = state["valid"][layer]
    C = valid_BKC.shape[-1]
    full_BK = jnp.all(valid_BKC, axis=-1)
    slot_BK = jnp.where(full_BK, C, jnp.argmin(valid_BKC, axis=-1))  # first empty slot; C = none (dropped)
    pos_BK = jnp.broadcast_to(positions_B[:, None], (B, K))
    state = _put(state, layer, slot_BK, {"k": k_BKD, "v": v_BKD, "pos": pos_BK, "valid": jnp.ones((B, K), bool),
                                         **{n: jnp.full((B, K), f) for n, f in dict(fresh).items()}})
    layer_state = read_layer(state, layer)
    out_BHD, probs_BKGX = attend_with_new(q_BHD, layer_state["k"], layer_state["v"], layer_state["valid"],
                                          k_BKD, v_BKD, full_BK)
    pos_BKX = jnp.concatenate([layer_state["pos"], jnp.where(full_BK, pos_BK, -1)[..., None]], axis=-1)
    valid_BKX = jnp.concatenate([layer_state["valid"], full_BK[..., None]], axis=-1)
    return out_BHD, state, Step(probs_BKGX, pos_BKX, valid_BKX, full_BK, k_BKD, v_BKD, positions_B)


def finish_decode(state: dict, layer, step: Step, drop_BK, stats_BKX: Dict[str, jax.Array] = (), evict_BKC=None):
    """Applies a policy's decision: per-slot statistics, evictions, and where the buffer was full, the new token
    into the slot of the dropped candidate drop_BK (C = the new token itself is dropped).

    stats_BKX: updated statistics of every candidate (column C: the new token's, used where it takes a slot).
    evict_BKC: optional extra evictions (slots emptied after this step).
    """
    stats_BKX = dict(stats_BKX)
    C = state["valid"].shape[3]
    updates = {name: x_BKX[..., :C] for name, x_BKX in stats_BKX.items()}
    if evict_BKC is not None:
        updates["valid"] = state["valid"][layer] & ~evict_BKC
        updates["pos"] = jnp.where(evict_BKC, -1, state["pos"][layer])
    state = write_layer(state, layer, updates)
    slot_BK = jnp.where(step.full_BK, drop_BK, C)  # rows that had room already hold the new token
    B, K = slot_BK.shape
    pos_BK = jnp.broadcast_to(step.positions_B[:, None], (B, K))
    return _put(state, layer, slot_BK, {"k": step.k_BKD, "v": step.v_BKD, "pos": pos_BK,
                                        "valid": jnp.ones((B, K), bool),
                                        **{name: x_BKX[..., C] for name, x_BKX in stats_BKX.items()}})


def masked_argmin(x_BKX, allowed_BKX) -> jax.Array:
    """Index of the smallest allowed entry (first one on ties); 0 where nothing is allowed."""
    return jnp.argmin(jnp.where(allowed_BKX, x_BKX, INF), axis=-1)


# ------------------------------------------------------------------------------------------------------ stats


def buffer_stats(state: dict, tokens_B) -> dict:
    """Kept entries per layer/sequence/head, logical CR (tokens seen / kept), bytes allocated and in use."""
    L, B, K, C, _ = state["k"].shape
    kept_LBK = jnp.sum(state["valid"], axis=-1).astype(jnp.float32)
    tokens_B = jnp.asarray(tokens_B)
    allocated = state_bytes(state)
    per_slot = allocated // (L * B * K * C)  # keys, values, position, validity and the policy's statistics
    seen_LBK = jnp.broadcast_to(tokens_B[None, :, None], (L, B, K)).astype(jnp.float32)
    return {
        "tokens_B": tokens_B,
        "kept_LBK": kept_LBK,
        "compression_ratio_LBK": seen_LBK / jnp.maximum(kept_LBK, 1.0),
        "compression_ratio": jnp.sum(seen_LBK) / jnp.maximum(jnp.sum(kept_LBK), 1.0),
        "capacity": C,
        "bytes_allocated": allocated,
        "bytes_in_use": jnp.sum(kept_LBK) * per_slot,  # fp32: exact int32 products overflow at 2 GiB
    }
