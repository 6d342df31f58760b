"""The DMS cache, paged: one pool of small pages shared by every (layer, sequence, KV head); memory follows what
each head keeps.

The DMS cache (dms.py) gives every head the same C slots, but trained DMS heads are very unbalanced (an early layer
keeps most tokens, deep layers a few percent): at a buffer sized for the average CR some heads overflow while
others waste their reserve. Here a head holds only the pages its tokens fill. The decisions, the delayed eviction
and therefore the tokens kept are DMSCache's with an unbounded buffer; only where a token lives differs.

Memory, per head: its tokens fill logical slots 0 .. count - 1, slot s at row s % N of page table[s // N]. A
token that leaves frees its slot and the head's next token takes that slot; otherwise the next token takes slot
count, and a new page comes from the pool only when that slot opens one. A DMS decode step adds one token to a head
and removes at most one (the token whose delay is over), so what a head keeps never shrinks within a sequence, its
slots stay contiguous and it holds exactly ceil(kept / N) pages: the pool's pages in use are the heads' kept tokens,
each head rounded up to a page. A row's pages go back to the pool when it is freed (free_rows) or prefilled again.
Contiguous slots make decode attention the paged DMC cache's, over the first `count` slots of each head (the
bucketed XLA path of paged_attention.py, or the Pallas kernel on GPU).

State:
    pool_k, pool_v  [P, N, Dh]     the page pool (keys after RoPE, values), shared by all layers and heads
    pool_pos        [P, N]         position of the token in each pool slot (valid below its head's count)
    free, top       [P], []        a stack of free page ids: free[:top] are free, pops take from the top
    refused         [2]            page requests the pool refused, cumulative: [decode, prefill]
    table           [L, B, K, M]   block table: the pages a head holds, -1 = none
    count           [L, B, K]      tokens the head holds (its slots in use)
    recent          [L, B, K, R]   the head's last R = min(w + 1, max_tokens) tokens: at p % R, 2 * slot + marked of
                                   the token at position p (-1 = none), so the token a decision marks (t - 1) and
                                   the one that may leave (t - 1 - w) are found without a search
    overflow        [L, B, K]      decode tokens that found no slot and no page, and prompt tokens forced out with
                                   on_overflow='evict' (see below; never silent)
    lost            [L, B, K]      tokens a prompt (or a row's first token) found no page for (always an error)

Decode, token t, per head: the decision of t marks t - 1; the token at t - 1 - w leaves if it was marked (delayed
eviction: at most one token leaves per step); t takes a slot (above). An exhausted pool is never silent: the head's
token closest to leaving (else its oldest: DMSCache's rule for a full buffer) gives its slot to t, `overflow` and
`refused` count it, and `check` raises a one-line UserError unless on_overflow='evict'. Prefill runs DMS's hard
parallel form (dms_core) and stores what a token-by-token pass holds after the last prompt token, in position order
(prompt='query': as many tokens per head, the old ones chosen by the last prompt token's attention; dms.prefill_kept).
A prompt that finds no page is an error (`lost`), except with on_overflow='evict': then the later layers' heads are
reserved an equal share of the pool, this layer's heads split the rest when they need more, and a head over its
part forces out tokens by the same rule (counted in `overflow`), so a pool sized for a baseline's bytes serves any
prompt.

Pool size: `pages`, else every head's share of DMSCache's buffer at target_cr x margin, pooled:
P = ceil(L * B * K * C / N) with C = dms.capacity_for(max_tokens, w, 0, target_cr, margin), at most the
no-compression worst case L * B * K * ceil(max_tokens / N). The bytes follow the budget; the heads share it unevenly.

Shape letters: L layers, B batch, K KV heads, P pool pages, N page size, M block-table width (pages per head),
R recent tokens per head, S slots per head (M * N), T prompt time, H query heads, Dh head dim, X flattened heads
(B * K).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from dmc_jax import kernels as dispatch
from dmc_jax.cache import registry
from dmc_jax.cache.dmc_paged import _pop as pop_pages, _push as push_pages  # the paged DMC cache's allocator
from dmc_jax.cache.dms import NEVER, OVERFLOW, TRAINED, _write, capacity_for, check_prompt, prefill_kept
from dmc_jax.cache.overflow import check_pool, check_sizing
from dmc_jax.cache.paged_attention import paged_decode_attention, paged_decode_attention_bucketed
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout, state_bytes
from dmc_jax.dms.config import DMSConfig, from_section, served
from dmc_jax.dms.decisions import read_decision, zero_decision_heads
from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig

POOL_KEYS = ("pool_k", "pool_v", "pool_pos", "free", "top", "refused")  # shared by all rows
PAGE_KEYS = ("pool_k", "pool_v", "pool_pos")  # one page's storage


def _at(x_BKR, i_BK):
    """x_BKR[b, k, i_BK[b, k]] (i_BK broadcast to [B, K], e.g. one index per row [B, 1])."""
    return jnp.take_along_axis(x_BKR, jnp.broadcast_to(i_BK, x_BKR.shape[:2])[..., None], axis=-1)[..., 0]


def _fit_prompt(kept_BKT, marked_BKT, count_BK, free_pages, num_layers: int, layer, page_size: int,
                window: int):
    """on_overflow='evict' at prefill: a prompt never runs the pool dry. Layers prefill one after another, so each
    head of a later layer is reserved the pages of what it holds whatever it decides, its last w + 1 tokens
    (ceil((w + 1) / N) pages); this layer's heads take what they need from the rest (water-filling: the first
    layers of a DMS model keep nearly every token, the later ones few), and when they need more than the rest, each
    takes at most an equal part of it, and a head over that forces out its marked tokens closest to leaving, then its
    oldest (DMSCache's rule for a full buffer). Returns (kept_BKT, forced_BK): what each head stores, and how many of
    its kept tokens it forced out."""
    B, K, _ = kept_BKT.shape
    reserve = -(-(window + 1) // page_size)  # pages a later head holds after any prompt longer than its window
    available = jnp.maximum(free_pages - (num_layers - 1 - layer) * B * K * reserve, 0)
    need = jnp.sum((count_BK + page_size - 1) // page_size)
    cap_BK = jnp.where(need <= available, count_BK, (available // (B * K)) * page_size)
    forced_BK = jnp.maximum(count_BK - cap_BK, 0).astype(jnp.int32)
    marked_BKT = kept_BKT & marked_BKT  # kept and marked: inside the window; the oldest leaves first
    drop_BKT = marked_BKT & (jnp.cumsum(marked_BKT, axis=-1) <= forced_BK[..., None])
    rest_BK = forced_BK - jnp.sum(drop_BKT, axis=-1, dtype=jnp.int32)
    plain_BKT = kept_BKT & ~marked_BKT
    drop_BKT |= plain_BKT & (jnp.cumsum(plain_BKT, axis=-1) <= rest_BK[..., None])
    return kept_BKT & ~drop_BKT, forced_BK


@dataclasses.dataclass(frozen=True)
class DMSPagedCache(RowOps):
    """DMS inference over a shared pool of `page_size`-slot pages (`pages`, or sized from target_cr x margin)."""

    layout = StateLayout(shared=POOL_KEYS, fills={"table": -1, "recent": -1}, kept=("overflow", "lost"))

    dms: DMSConfig = DMSConfig()
    page_size: int = 16
    pages: int = 0                   # pool size; 0 = from target_cr and margin (or the no-compression worst case)
    target_cr: float = 0.0
    margin: float = 1.25
    on_overflow: str = "error"
    threshold: float = 0.0           # cache.dms.threshold's meaning: mark where the decision logit exceeds it
    prompt: str = "dms"              # cache.dms.prompt's meaning (dms.prefill_kept): 'dms' | 'query'
    attend_growth: float = 2 ** 0.5  # XLA attention: ratio of the gathered table widths (paged_attention.py); 0 = all
    kernels: str = "auto"            # 'auto': the Pallas kernel on GPU, XLA elsewhere; 'pallas' | 'xla'
    name: str = "dms_paged"

    def __post_init__(self):
        check_sizing("dms_paged", "pages", self.pages, self.target_cr, self.margin, self.on_overflow, OVERFLOW)
        if not 1 <= self.page_size <= 256:
            raise UserError(f"cache.dms_paged.page_size must be in [1, 256]; got {self.page_size}")
        if self.attend_growth and self.attend_growth <= 1:
            raise UserError(f"cache.dms_paged.attend_growth must be > 1 (or 0: gather the whole table); "
                            f"got {self.attend_growth}")
        if self.kernels not in dispatch.KERNELS:
            raise UserError(f"cache.dms_paged.kernels must be one of {', '.join(dispatch.KERNELS)}; "
                            f"got {self.kernels!r}")
        if not math.isfinite(self.threshold):
            raise UserError(f"cache.dms_paged.threshold must be a finite number; got {self.threshold}")
        check_prompt("dms_paged", self.prompt)

    reads_adapter = True  # llama.py passes a DMS adapter's logits (adapter_BTK; T = 1 at decode) when there is one
    scan_layers = True    # its unrolled decode compiles 10x longer than scanned (protocol.py)

    @property
    def always_kept(self) -> int:
        """Tokens each head keeps whatever its CR: a marked token stays visible for w more steps (serving sizing)."""
        return self.dms.window + 1

    def _decision(self, q_BTHD, K: int, dms: DMSConfig, adapter_BTK=None):
        """read_decision with the serving threshold: a token is marked when its logit exceeds `threshold`."""
        a_BTK, q_BTHD = read_decision(q_BTHD, K, dms, adapter_BTK)
        return a_BTK - self.threshold, q_BTHD

    # ------------------------------------------------------------------------------------------------ state
    def pool_pages(self, cfg: ModelConfig, batch: int, max_tokens: int) -> int:
        """`pages`, else ceil(L*B*K heads x DMSCache's C slots / N) at target_cr x margin, at most the worst case."""
        heads = cfg.num_layers * batch * cfg.num_kv_heads
        worst = heads * math.ceil(max_tokens / self.page_size)
        if self.pages:
            return self.pages
        if self.target_cr:
            C = capacity_for(max_tokens, self.dms.window, 0, self.target_cr, self.margin)
            return min(worst, math.ceil(heads * C / self.page_size))
        return worst

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        self.dms.check_context(cfg.max_seq_len, "the model's context (model.max_seq_len)")
        L, K, Dh, N = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, self.page_size
        P, M = self.pool_pages(cfg, batch, max_tokens), math.ceil(max_tokens / N)
        R = min(self.dms.window + 1, max_tokens)
        return {"pool_k": jnp.zeros((P, N, Dh), cfg.dtype), "pool_v": jnp.zeros((P, N, Dh), cfg.dtype),
                "pool_pos": jnp.full((P, N), -1, jnp.int32),
                "free": jnp.arange(P - 1, -1, -1, dtype=jnp.int32),  # pops hand out pages 0, 1, 2, ...
                "top": jnp.int32(P), "refused": jnp.zeros((2,), jnp.int32),
                "table": jnp.full((L, batch, K, M), -1, jnp.int32), "count": jnp.zeros((L, batch, K), jnp.int32),
                "recent": jnp.full((L, batch, K, R), -1, jnp.int32),
                "overflow": jnp.zeros((L, batch, K), jnp.int32), "lost": jnp.zeros((L, batch, K), jnp.int32)}

    def free_rows(self, state, done_B):
        """Returns every page of the rows done_B to the pool, then empties the rows (counters are kept)."""
        pages_X = jnp.where(done_B[None, :, None, None], state["table"], -1).reshape(-1)
        free_P, top = push_pages(state["free"], state["top"], pages_X)
        return super().free_rows(dict(state, free=free_P, top=top), done_B)

    def _attend(self, q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK):
        if dispatch.use_pallas(self.kernels):
            return dispatch.paged_decode_attention(q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK, self.kernels)
        if not self.attend_growth:
            return paged_decode_attention(q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK)
        return paged_decode_attention_bucketed(q_BHD, pool_k_PND, pool_v_PND, table_BKM, count_BK, self.attend_growth)

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn, adapter_BTK=None):
        B, K, Dh = k_BKD.shape
        dms, w = self.dms.replace(mode="hard"), self.dms.window
        a_B1K, q_B1HD = self._decision(q_BHD[:, None], K, dms, adapter_BTK)
        q_BHD = rope(q_B1HD, positions_B[:, None])[:, 0]
        if dms.zeroes_q_after_rope:
            q_BHD = zero_decision_heads(q_BHD, K, dms.channel(Dh))
        k_BKD = rope(k_BKD[:, None], positions_B[:, None])[:, 0]
        table_BKM, count_BK, recent_BKR = state["table"][layer], state["count"][layer], state["recent"][layer]
        M, R = table_BKM.shape[2], recent_BKR.shape[2]
        P, N = state["pool_pos"].shape
        b_BK, k_BK = jnp.meshgrid(jnp.arange(B), jnp.arange(K), indexing="ij")
        t_B1 = positions_B[:, None]
        r_11R = jnp.arange(R)[None, None]
        idle_BK = (count_BK == 0) & (t_B1 > 0)  # a freed row decoding a pad token: takes nothing, writes nothing
        page_of = lambda slot_BK: table_BKM[b_BK, k_BK, jnp.clip(slot_BK // N, 0, M - 1)]
        # 1. The decision of t marks t - 1 (its entry in `recent` gets the mark bit).
        mark_BK = (a_B1K[:, 0] > 0) & (t_B1 > 0) & (_at(recent_BKR, (t_B1 - 1) % R) >= 0)
        recent_BKR |= ((r_11R == ((t_B1 - 1) % R)[..., None]) & mark_BK[..., None]).astype(jnp.int32)
        # 2. The token at t - 1 - w leaves if it was marked (and still holds its slot: not pushed out early).
        old_BK = _at(recent_BKR, (t_B1 - 1 - w) % R)
        old_slot_BK = old_BK // 2
        gone_BK = (t_B1 - 1 - w >= 0) & (old_BK >= 0) & (old_BK % 2 == 1)
        gone_BK &= state["pool_pos"][jnp.clip(page_of(old_slot_BK), 0, P - 1), old_slot_BK % N] == t_B1 - 1 - w
        # 3. Token t takes the slot that was freed, else slot `count` (a new page when it opens one), else (pool
        # exhausted) a victim's.
        slot_BK = jnp.where(gone_BK, old_slot_BK, count_BK)
        need_BK = ~idle_BK & ~gone_BK & ((slot_BK >= M * N) | (page_of(slot_BK) < 0))
        new_page_BK, top = pop_pages(state["free"], state["top"],
                                     (need_BK & (slot_BK < M * N)).reshape(-1).astype(jnp.int32), 1)
        new_page_BK = new_page_BK.reshape(B, K)
        short_BK = need_BK & (new_page_BK < 0)
        opens_BKM = (jnp.arange(M)[None, None] == (slot_BK // N)[..., None]) & (need_BK & ~short_BK)[..., None]
        table_BKM = jnp.where(opens_BKM, new_page_BK[..., None], table_BKM)
        victim_BK = jax.lax.cond(jnp.any(short_BK),
                                 lambda: self._victims(state["pool_pos"], table_BKM, count_BK, recent_BKR, t_B1),
                                 lambda: jnp.full((B, K), -1, jnp.int32))
        slot_BK = jnp.where(short_BK, victim_BK, slot_BK)
        write_BK = ~idle_BK & (slot_BK >= 0)
        page_BK = jnp.where(write_BK, page_of(slot_BK), P)  # P: out of range, dropped
        row_BK = slot_BK % N
        pool_k = state["pool_k"].at[page_BK, row_BK].set(k_BKD.astype(state["pool_k"].dtype), mode="drop")
        pool_v = state["pool_v"].at[page_BK, row_BK].set(v_BKD.astype(state["pool_v"].dtype), mode="drop")
        pool_pos = state["pool_pos"].at[page_BK, row_BK].set(jnp.broadcast_to(t_B1, (B, K)), mode="drop")
        recent_BKR = jnp.where((r_11R == (t_B1 % R)[..., None]) & ~idle_BK[..., None],
                               jnp.where(write_BK, 2 * slot_BK, -1)[..., None], recent_BKR)
        count_BK = count_BK + (write_BK & ~gone_BK & ~short_BK).astype(jnp.int32)
        lost_BK = short_BK & (t_B1 == 0)
        state = dict(state, pool_k=pool_k, pool_v=pool_v, pool_pos=pool_pos, top=top,
                     refused=state["refused"].at[0].add(jnp.sum(short_BK, dtype=jnp.int32)))
        state = _write(state, layer, {
            "table": table_BKM, "count": count_BK, "recent": recent_BKR,
            "overflow": state["overflow"][layer] + (short_BK & ~lost_BK).astype(jnp.int32),
            "lost": state["lost"][layer] + lost_BK.astype(jnp.int32)})
        return self._attend(q_BHD, pool_k, pool_v, table_BKM, count_BK), state

    def _victims(self, pos_PN, table_BKM, count_BK, recent_BKR, t_B1):
        """[B, K] slot of each head's marked token closest to leaving, else of its oldest token (DMSCache's rule for a
        full buffer); -1 for a head without tokens."""
        P, N = pos_PN.shape
        R = recent_BKR.shape[-1]
        pos_BKS = pos_PN[jnp.clip(table_BKM, 0, P - 1)].reshape(table_BKM.shape[:2] + (-1,))
        in_use_BKS = jnp.arange(pos_BKS.shape[-1])[None, None] < count_BK[..., None]
        oldest_BK = jnp.argmin(jnp.where(in_use_BKS, pos_BKS, NEVER), axis=-1)
        # recent entry r holds position p = the latest p <= t - 1 with p % R == r; it is marked and still in its slot
        p_BKR = jnp.broadcast_to(t_B1[..., None] - 1 - (t_B1[..., None] - 1 - jnp.arange(R)) % R, recent_BKR.shape)
        slot_BKR = recent_BKR // 2
        marked_BKR = (recent_BKR >= 0) & (recent_BKR % 2 == 1) & (p_BKR >= 0)
        marked_BKR &= jnp.take_along_axis(pos_BKS, jnp.clip(slot_BKR, 0, pos_BKS.shape[-1] - 1), axis=-1) == p_BKR
        leaves_first_BK = _at(slot_BKR, jnp.argmin(jnp.where(marked_BKR, p_BKR, NEVER), axis=-1))
        victim_BK = jnp.where(jnp.any(marked_BKR, axis=-1), leaves_first_BK, oldest_BK)
        return jnp.where(count_BK > 0, victim_BK, -1).astype(jnp.int32)

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn, adapter_BTK=None):
        B, T = q_BTHD.shape[:2]
        K = k_BTKD.shape[2]
        # What the cache holds after the last prompt token (as DMSCache): dms.prefill_kept
        out_BTHD, marked_BKT, kept_BKT = prefill_kept(self, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope, adapter_BTK)
        t_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = jnp.broadcast_to(t_T, (B, T))
        L_B11 = lengths_B[:, None, None]
        t_11T = t_T[None, None]
        count_BK = jnp.sum(kept_BKT, axis=-1, dtype=jnp.int32)
        # Pages: a row admitted again gives back what it held in this layer, then takes ceil(count / N) pages.
        P, N = state["pool_pos"].shape
        M, R = state["table"].shape[3], state["recent"].shape[3]
        free_P, top = push_pages(state["free"], state["top"], state["table"][layer].reshape(-1))
        forced_BK = jnp.zeros_like(count_BK)
        if self.on_overflow == "evict":
            kept_BKT, forced_BK = _fit_prompt(kept_BKT, marked_BKT, count_BK, top, state["table"].shape[0],
                                              layer, N, self.dms.window)
            count_BK = count_BK - forced_BK
        need_BK = (jnp.minimum(count_BK, M * N) + N - 1) // N
        pages_XM, top = pop_pages(free_P, top, need_BK.reshape(-1), M)
        table_BKM = pages_XM.reshape(B, K, M)
        stored_BK = jnp.minimum(count_BK, jnp.sum(table_BKM >= 0, axis=-1) * N)
        # Kept token j takes slot rank(j): its order among the kept tokens.
        slot_BKT = jnp.cumsum(kept_BKT, axis=-1, dtype=jnp.int32) - 1
        store_BKT = kept_BKT & (slot_BKT < stored_BK[..., None])
        b_BKT = jnp.broadcast_to(jnp.arange(B)[:, None, None], slot_BKT.shape)
        k_BKT = jnp.broadcast_to(jnp.arange(K)[None, :, None], slot_BKT.shape)
        page_BKT = jnp.where(store_BKT, table_BKM[b_BKT, k_BKT, jnp.clip(slot_BKT // N, 0, M - 1)], P)
        row_BKT = jnp.maximum(slot_BKT, 0) % N
        k_BKTD = jnp.swapaxes(rope(k_BTKD, positions_BT), 1, 2)
        pool_k = state["pool_k"].at[page_BKT, row_BKT].set(k_BKTD.astype(state["pool_k"].dtype), mode="drop")
        pool_v = state["pool_v"].at[page_BKT, row_BKT].set(jnp.swapaxes(v_BTKD, 1, 2).astype(state["pool_v"].dtype),
                                                           mode="drop")
        pool_pos = state["pool_pos"].at[page_BKT, row_BKT].set(jnp.broadcast_to(t_11T, slot_BKT.shape), mode="drop")
        # The last R tokens at position % R (the next decode step marks L - 1 and may free L - 1 - w).
        recent_at_BKT = jnp.where(store_BKT & (t_11T >= L_B11 - R), t_11T % R, R)
        recent_BKR = jnp.full((B, K, R), -1, jnp.int32).at[b_BKT, k_BKT, recent_at_BKT].set(
            2 * slot_BKT + marked_BKT.astype(jnp.int32), mode="drop")
        refused = jnp.sum(need_BK, dtype=jnp.int32) - jnp.sum(table_BKM >= 0, dtype=jnp.int32)
        state = dict(state, pool_k=pool_k, pool_v=pool_v, pool_pos=pool_pos, free=free_P, top=top,
                     refused=state["refused"].at[1].add(refused))
        new = {"table": table_BKM, "count": stored_BK, "recent": recent_BKR, "overflow": forced_BK,
               "lost": count_BK - stored_BK}
        return out_BTHD, _write(state, layer, new)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self, state, tokens_B):
        P, N = state["pool_pos"].shape
        L, B, K = state["count"].shape
        per_page = sum(state[n].size * state[n].dtype.itemsize for n in PAGE_KEYS) // P
        table_bytes = sum(state[n].size * state[n].dtype.itemsize for n in ("table", "recent", "count", "free"))
        kept_LBK = state["count"].astype(jnp.float32)
        tokens_B = jnp.asarray(tokens_B)
        seen_LBK = jnp.broadcast_to(tokens_B[None, :, None], (L, B, K)).astype(jnp.float32)
        return {"tokens_B": tokens_B, "kept_LBK": kept_LBK, "overflow_LBK": state["overflow"] + state["lost"],
                "compression_ratio_LBK": seen_LBK / jnp.maximum(kept_LBK, 1.0),
                "compression_ratio": jnp.sum(seen_LBK) / jnp.maximum(jnp.sum(kept_LBK), 1.0),
                "bytes_allocated": state_bytes(state), "bytes_pool": P * per_page, "bytes_tables": table_bytes,
                "bytes_in_use": (P - state["top"]) * per_page, "pages": P, "pages_free": state["top"],
                "page_size": N}

    def check(self, state) -> None:
        """UserError naming the first (layer, head) the pool failed (decode overflow allowed with 'evict')."""
        check_pool(state, "DMS paged cache", "dms_paged", "tokens", "found no slot and no free page",
                   "tokens forced out early", "evict", self.on_overflow != "error")


registry.register(registry.MethodSpec(
    name="dms_paged", trained=TRAINED, sized_by_cr=True,
    defaults={"page_size": 16, "pages": 0, "target_cr": 0.0, "margin": 1.25, "on_overflow": "error",
              "threshold": 0.0, "window": 0, "attend_growth": 1.4142, "kernels": "auto", "prompt": "dms"},
    build=lambda s, hparams: DMSPagedCache(served(from_section(hparams), s.window), page_size=s.page_size,
                                           pages=s.pages, target_cr=s.target_cr, margin=s.margin, on_overflow=s.on_overflow,
                                           threshold=float(s.threshold), prompt=s.prompt, attend_growth=s.attend_growth,
                                           kernels=s.kernels),
    summary="DMS over a shared pool of pages: each head holds what it keeps (serving)"))
