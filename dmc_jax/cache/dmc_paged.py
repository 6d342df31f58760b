"""The DMC cache, paged: one pool of small pages shared by every (layer, sequence, KV head); memory follows the CR.

The padded cache reserves `capacity` slots for every head, so a head that compresses well wastes its reserve and
one that compresses badly overflows. Here a head holds only the pages its slots fill: slot s lives in page
table[s // N] at row s % N. The DMC state machine and decisions are the padded cache's (dmc_common.py); only
where a slot lives differs, so both caches give the same outputs.

State:
    pool_k, pool_v  [P, N, Dh]     the page pool (keys after RoPE, values), shared by all layers and heads
    free            [P]            a stack of free page ids: free[:top] are free, pops take from the top
    top             []             free pages
    refused         [2]            page requests the pool refused, cumulative: [decode, prefill]
    table           [L, B, K, M]   block table: the page ids a head holds, -1 = none
    count           [L, B, K]      slots in use (1 + appends after the first token)
    overflow        [L, B, K]      decode appends that found no page (merged into the last slot instead)
    lost            [L, B, K]      slots a prompt (or a first token) found no page for (always an error)
    open slot       mk, mv, z (unbounded window) or rk, rv, rw (window w), [L, B, K, ...]: see dmc_common.py

Allocation happens inside the jitted steps, for all heads of a layer at once: the heads that need pages take
consecutive entries from the top of the free stack by an exclusive prefix sum of their needs (decode: a head
whose append opens a slot in a page it does not hold needs one; prefill: ceil(slots / N) each, after returning
the pages the rows held). `free_sequences` returns the pages of finished rows; `take_rows` / `put_rows` let a
serving loop prefill new prompts into those rows while the other rows keep their state:

    state = free_sequences(state, done_B)                   # finished rows give their pages back
    sub = take_rows(state, rows_R)                          # the freed rows, with the shared pool
    logits_RV, sub = llama.prefill(params, tokens_RT, lengths_R, sub, method, cfg)
    state = put_rows(state, sub, rows_R)                    # then decode all rows, each at its own position

A row with no slots that is not at its first token is idle: decoding it takes no page and writes nothing.

An exhausted pool is never silent: the append merges into the head's last slot (so the state stays valid), the
head's `overflow` and `refused` count it, and `check` raises a UserError naming the layer and head unless
on_overflow='merge'. Prompt slots without a page are always an error.

Shape letters: L layers, B batch, K KV heads, P pool pages, N page size (slots per page), M block-table width
(pages per head), T prompt time, H query heads, Dh head dim, X flattened heads (B * K), R selected rows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dmc_jax import kernels as dispatch
from dmc_jax.cache import registry
from dmc_jax.cache.dmc_common import (OPEN_SLOT_KEYS, OVERFLOW, SIZING, SIZING_LEGACY, TRAINED, decode_decisions, init_open_slot, prefill_slots,
                                      rotate, update_open_slot, write_layer)
from dmc_jax.cache.overflow import check_pool, check_sizing
from dmc_jax.cache.paged_attention import paged_decode_attention, paged_decode_attention_bucketed
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout, state_bytes
from dmc_jax.dmc.config import DMCConfig, from_section
from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig

POOL_KEYS = ("pool_k", "pool_v", "free", "top", "refused")  # shared by all rows; every other leaf is [L, B, ...]


def _pop(free_P, top, need_X, width: int):
    """Takes need_X[x] pages for every x at once: ([X, width] page ids, -1 where none was left; the new top)."""
    start_X = jnp.cumsum(need_X) - need_X
    j_W = jnp.arange(width)
    index_XW = start_X[:, None] + j_W[None]
    granted_XW = (j_W[None] < need_X[:, None]) & (index_XW < top)
    pages_XW = jnp.where(granted_XW, free_P[jnp.clip(top - 1 - index_XW, 0, free_P.shape[0] - 1)], -1)
    return pages_XW, top - jnp.sum(granted_XW, dtype=jnp.int32)


def _push(free_P, top, pages_X):
    """Returns the pages pages_X >= 0 to the free stack."""
    held_X = pages_X >= 0
    rank_X = jnp.cumsum(held_X, dtype=jnp.int32) - 1
    at_X = jnp.where(held_X, top + rank_X, free_P.shape[0])  # out of range: dropped
    return free_P.at[at_X].set(pages_X, mode="drop"), top + jnp.sum(held_X, dtype=jnp.int32)


def free_sequences(state: dict, done_B: jax.Array) -> dict:
    """Returns every page of the rows done_B to the pool and empties those rows (jit-able; counters are kept)."""
    done_1B11 = done_B[None, :, None, None]
    free_P, top = _push(state["free"], state["top"], jnp.where(done_1B11, state["table"], -1).reshape(-1))
    new = dict(state, free=free_P, top=top, table=jnp.where(done_1B11, -1, state["table"]),
               count=jnp.where(done_1B11[..., 0], 0, state["count"]))
    for name in OPEN_SLOT_KEYS:
        if name in state:
            new[name] = jnp.where(done_B.reshape((1, -1) + (1,) * (state[name].ndim - 2)), 0, state[name])
    return new


def take_rows(state: dict, rows_R: jax.Array) -> dict:
    """A state of batch R: rows rows_R of every per-row leaf, and the shared pool (to prefill new prompts there)."""
    return {name: x if name in POOL_KEYS else x[:, rows_R] for name, x in state.items()}


def put_rows(state: dict, sub: dict, rows_R: jax.Array) -> dict:
    """Writes a take_rows state (after prefill or decode) back into rows rows_R; the pool comes from `sub`."""
    return {name: sub[name] if name in POOL_KEYS else x.at[:, rows_R].set(sub[name]) for name, x in state.items()}


@dataclasses.dataclass(frozen=True)
class DMCPagedCache(RowOps):
    """DMC inference over a shared pool of `page_size`-slot pages (`pages`, or sized from target_cr x margin)."""

    layout = StateLayout(shared=POOL_KEYS, kept=("overflow", "lost"))

    def free_rows(self, state, done_B):
        """Returns the rows' pages to the pool, then empties them."""
        return free_sequences(state, done_B)

    dmc: DMCConfig = DMCConfig()
    page_size: int = 16
    pages: int = 0                   # pool size; 0 = from target_cr and margin (or the no-compression worst case)
    target_cr: float = 0.0
    margin: float = 1.25
    on_overflow: str = "error"
    attend_growth: float = 2 ** 0.5  # XLA attention: ratio of the gathered table widths (paged_attention.py); 0 = all
    kernels: str = "auto"            # 'auto': the Pallas kernel on GPU, XLA elsewhere; 'pallas' | 'xla'
    name: str = "dmc_paged"

    def __post_init__(self):
        check_sizing("dmc_paged", "pages", self.pages, self.target_cr, self.margin, self.on_overflow, OVERFLOW)
        if not 1 <= self.page_size <= 256:
            raise UserError(f"cache.dmc_paged.page_size must be in [1, 256] (16-64 suits DMC); got {self.page_size}")
        if self.attend_growth and self.attend_growth <= 1:
            raise UserError(f"cache.dmc_paged.attend_growth must be > 1 (or 0: gather the whole table); got {self.attend_growth}")
        if self.kernels not in dispatch.KERNELS:
            raise UserError(f"cache.dmc_paged.kernels must be one of {', '.join(dispatch.KERNELS)}; got {self.kernels!r}")

    # ------------------------------------------------------------------------------------------------ state
    def pool_pages(self, cfg: ModelConfig, batch: int, max_tokens: int) -> int:
        """`pages`, else L*B*K heads x ceil(max_tokens / (target_cr * N)) pages x margin, at most the worst case."""
        heads = cfg.num_layers * batch * cfg.num_kv_heads
        worst = heads * math.ceil(max_tokens / self.page_size)
        if self.pages:
            return self.pages
        if self.target_cr:
            return min(worst, math.ceil(heads * math.ceil(max_tokens / self.target_cr / self.page_size) * self.margin))
        return worst

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        L, K, Dh, N = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.page_size
        P, M = self.pool_pages(cfg, batch, max_tokens), math.ceil(max_tokens / N)
        state = {"pool_k": jnp.zeros((P, N, Dh), cfg.dtype), "pool_v": jnp.zeros((P, N, Dh), cfg.dtype),
                 "free": jnp.arange(P - 1, -1, -1, dtype=jnp.int32),  # pops hand out pages 0, 1, 2, ...
                 "top": jnp.int32(P), "refused": jnp.zeros((2,), jnp.int32),
                 "table": jnp.full((L, batch, K, M), -1, jnp.int32), "count": jnp.zeros((L, batch, K), jnp.int32),
                 "overflow": jnp.zeros((L, batch, K), jnp.int32), "lost": jnp.zeros((L, batch, K), jnp.int32)}
        state.update(init_open_slot(self.dmc, L, batch, K, Dh))
        return state

    def _attend(self, q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK):
        if dispatch.use_pallas(self.kernels):
            return dispatch.paged_decode_attention(q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK, self.kernels)
        if not self.attend_growth:
            return paged_decode_attention(q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK)
        return paged_decode_attention_bucketed(q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK, self.attend_growth)

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn):
        x = decode_decisions(self.dmc, q_BHD, k_BKD, v_BKD, positions_B)
        s = {name: state[name][layer] for name in ("table", "count", "overflow", "lost", *OPEN_SLOT_KEYS)
             if name in state}
        table_BKM, count_BK = s["table"], s["count"]
        B, K, M = table_BKM.shape
        P, N = state["pool_k"].shape[:2]
        b_BK, k_BK = jnp.meshgrid(jnp.arange(B), jnp.arange(K), indexing="ij")
        idle_BK = (count_BK == 0) & ~x.first_BK
        opens_BK = ~x.merge_BK & ~idle_BK
        slot_BK = jnp.where(x.first_BK, 0, count_BK)  # the slot an append opens
        page_at_BK = jnp.minimum(slot_BK // N, M - 1)
        need_BK = opens_BK & (slot_BK < M * N) & (table_BKM[b_BK, k_BK, page_at_BK] < 0)
        page_BK, top = _pop(state["free"], state["top"], need_BK.reshape(-1).astype(jnp.int32), 1)
        page_BK = page_BK.reshape(B, K)
        short_BK = (need_BK & (page_BK < 0)) | (opens_BK & (slot_BK >= M * N))
        overflow_BK, lost_BK = short_BK & ~x.first_BK, short_BK & x.first_BK
        merge_BK = x.merge_BK | overflow_BK  # no page: merge into the last slot (an error unless 'merge')
        table_BKM = table_BKM.at[b_BK, k_BK, jnp.where(page_BK >= 0, page_at_BK, M)].set(page_BK, mode="drop")
        count_BK = jnp.where(idle_BK | lost_BK, count_BK,
                             jnp.where(x.first_BK, 1, count_BK + (~merge_BK).astype(jnp.int32)))
        mk_BKD, mv_BKD, new = update_open_slot(self.dmc, s, merge_BK, x, positions_B)
        new.update(table=table_BKM, count=count_BK, overflow=s["overflow"] + overflow_BK.astype(jnp.int32),
                   lost=s["lost"] + lost_BK.astype(jnp.int32))
        # The newest slot: one row per head scattered into its page, in place in the carried pool.
        slot_BK = jnp.maximum(count_BK - 1, 0)
        page_BK = table_BKM[b_BK, k_BK, jnp.minimum(slot_BK // N, M - 1)]
        page_BK = jnp.where(idle_BK | lost_BK | (page_BK < 0), P, page_BK)  # out of range: dropped
        key_BKD = rotate(self.dmc, mk_BKD.astype(state["pool_k"].dtype), positions_B, rope)
        pool_k = state["pool_k"].at[page_BK, slot_BK % N].set(key_BKD, mode="drop")
        pool_v = state["pool_v"].at[page_BK, slot_BK % N].set(mv_BKD.astype(state["pool_v"].dtype), mode="drop")
        q_BHD = rotate(self.dmc, x.q_BHD, positions_B, rope)
        out_BHD = self._attend(q_BHD, pool_k, pool_v, table_BKM, count_BK)
        state = dict(state, pool_k=pool_k, pool_v=pool_v, top=top,
                     refused=state["refused"].at[0].add(jnp.sum(short_BK, dtype=jnp.int32)))
        return out_BHD, write_layer(state, layer, new)

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn):
        p = prefill_slots(self.dmc, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope)
        B, T, K = p.slot_BTK.shape
        P, N = state["pool_k"].shape[:2]
        M = state["table"].shape[3]
        # A row admitted again gives back what it held in this layer before taking the pages its prompt needs.
        free_P, top = _push(state["free"], state["top"], state["table"][layer].reshape(-1))
        need_BK = (jnp.minimum(p.count_BK, M * N) + N - 1) // N
        pages_XM, top = _pop(free_P, top, need_BK.reshape(-1), M)
        table_BKM = pages_XM.reshape(B, K, M)
        kept_BK = jnp.minimum(p.count_BK, jnp.sum(table_BKM >= 0, axis=-1) * N)
        b_BTK = jnp.broadcast_to(jnp.arange(B)[:, None, None], (B, T, K))
        k_BTK = jnp.broadcast_to(jnp.arange(K)[None, None], (B, T, K))
        stored_BTK = (p.slot_BTK >= 0) & (p.slot_BTK < kept_BK[:, None])
        slot_BTK = jnp.where(stored_BTK, p.slot_BTK, 0)
        page_BTK = jnp.where(stored_BTK, table_BKM[b_BTK, k_BTK, jnp.minimum(slot_BTK // N, M - 1)], P)
        pool_k = state["pool_k"].at[page_BTK, slot_BTK % N].set(p.khat_BTKD.astype(state["pool_k"].dtype),
                                                                mode="drop")
        pool_v = state["pool_v"].at[page_BTK, slot_BTK % N].set(p.vhat_BTKD.astype(state["pool_v"].dtype),
                                                                mode="drop")
        refused = jnp.sum(need_BK, dtype=jnp.int32) - jnp.sum(table_BKM >= 0, dtype=jnp.int32)
        state = dict(state, pool_k=pool_k, pool_v=pool_v, free=free_P, top=top,
                     refused=state["refused"].at[1].add(refused))
        new = {"table": table_BKM, "count": kept_BK, "overflow": jnp.zeros_like(kept_BK),
               "lost": p.count_BK - kept_BK, **p.open_slot}
        return p.out_BTHD, write_layer(state, layer, new)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self, state, tokens_B):
        P, N, Dh = state["pool_k"].shape
        per_page = 2 * N * Dh * state["pool_k"].dtype.itemsize
        table_bytes = sum(state[n].size * state[n].dtype.itemsize for n in ("table", "free", "count"))
        return {"tokens_B": tokens_B, "kept_LBK": state["count"].astype(jnp.float32),
                "overflow_LBK": state["overflow"] + state["lost"], "bytes_allocated": state_bytes(state),
                "bytes_pool": P * per_page, "bytes_tables": table_bytes,
                "bytes_in_use": (P - state["top"]) * per_page, "pages": P, "pages_free": state["top"],
                "page_size": N}

    def check(self, state) -> None:
        """UserError naming the first (layer, head) the pool failed (decode overflow allowed with 'merge')."""
        check_pool(state, "DMC paged cache", "dmc_paged", "slots", "found no free page", "appends merged instead",
                   "merge", self.on_overflow != "error")


registry.register(registry.MethodSpec(
    name="dmc_paged", trained=TRAINED, sized_by_cr=True,
    defaults={"page_size": 16, "pages": 0, **SIZING, "attend_growth": 1.4142, "kernels": "auto"},
    legacy={"page_size": "page_size", "pages": "pages", "attend_growth": "attend_growth", "kernels": "kernels",
            **SIZING_LEGACY},
    build=lambda s, hparams: DMCPagedCache(from_section(hparams), page_size=s.page_size, pages=s.pages,
                                           target_cr=s.target_cr, margin=s.margin, on_overflow=s.on_overflow,
                                           attend_growth=s.attend_growth, kernels=s.kernels),
    summary="DMC over a shared pool of pages with block tables (serving)"))
