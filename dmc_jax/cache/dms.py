"""The DMS cache: a fixed buffer of C slots per (layer, sequence, KV head); evicted tokens free their slot.

DMS (dmc_jax/dms/) marks token t - 1 for eviction from the query of token t; a marked token stays for w more
tokens (delayed eviction) and then leaves, so at any time a head holds its last w + 1 tokens plus the older ones it
chose to keep. C is sized from the budget, never from the sequence length: C = ceil((max_tokens - w - 1) /
target_cr * margin) + w + 1 (or cache.capacity), at most max_tokens.

State (stacked over layers):
    k, v      [L, B, K, C, Dh]  keys after RoPE (at their positions) and values
    pos       [L, B, K, C]      position of the token in each slot, -1 = free
    evict_at  [L, B, K, C]      position at which the slot's token leaves (NEVER = not marked)
    last      [L, B, K]         slot of the newest token (the one the next decision may mark)
    overflow  [L, B, K]         decode tokens that found no free slot (see below; never silent)
    lost      [L, B, K]         prompt tokens beyond C at prefill (always an error)
Decode, token t: mark the previous token (evict_at = t + w) if the decision says so, free the slots whose time has
come (evict_at <= t), write t into the first free slot, attend over the occupied slots. A full buffer takes the slot
of the marked token closest to leaving (else the oldest token) and counts it in `overflow`; `check` raises a
UserError unless on_overflow='evict'. `threshold` (cache.dms.threshold, 0 = the trained rule) moves the decision
boundary at serving time: a token is marked when its decision logit exceeds it, so a positive threshold keeps more
(lower CR, better quality) and a negative one evicts more, from the same trained model. `window` (cache.dms.window,
0 = the trained w) serves with another delay: a longer one keeps more of the recent past (dmc_jax/dms/config.served). Prefill runs DMS's hard parallel form over the prompt (the delayed-eviction
mask) and keeps what a token-by-token pass would hold after the last prompt token, in position order; with
prompt='query' the prompt is attended densely and each head keeps as many tokens, chosen by the last prompt token's
attention (prefill_kept).

Shape letters: L layers, B batch, K KV heads, C slots, T prompt time, H query heads, Dh head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import registry
from dmc_jax.cache.overflow import check_buffer, check_sizing
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout, state_bytes
from dmc_jax.cache.zeroed_channel import ZeroedChannel, rope_zeroing_queries
from dmc_jax.dms.attention import dms_core
from dmc_jax.dms.config import DMSConfig, default_section, from_section, served, validate_section
from dmc_jax.dms.decisions import decisions, read_decision, zero_decision_heads
from dmc_jax.errors import UserError
from dmc_jax.model.attention import decode_attention
from dmc_jax.model.config import ModelConfig

NEVER = np.iinfo(np.int32).max
OVERFLOW = ("error", "evict")
PROMPTS = ("dms", "query")  # what a prompt leaves in the cache (prefill_kept)


def capacity_for(max_tokens: int, window: int, capacity: int, target_cr: float, margin: float) -> int:
    """Slots per head: `capacity` if set, else the window plus the rest at target_cr x margin, at most max_tokens."""
    if capacity:
        return min(capacity, max_tokens)
    if target_cr:
        rest = max(max_tokens - window - 1, 0)
        return min(max_tokens, math.ceil(rest / target_cr * margin) + window + 1)
    return max_tokens


def prefill_kept(cache, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn, adapter_BTK=None):
    """DMS's hard parallel form over right-padded prompts, and what a DMS cache holds after them (both caches, padded
    and paged): (out_BTHD, marked_BKT, kept_BKT). Token j < L is kept unless marked (by token j + 1 < L) and out of
    the window (L - 1 - j > w); cache: a DMSCache or DMSPagedCache (its dms settings, serving threshold and `prompt`).

    prompt='query' (PROMPTS): the prompt is attended densely instead (every eviction policy's prefill) and each head
    keeps as many tokens as DMS would, its last w + 1 and, of the older ones, those the last prompt token attends to
    most (TOVA's prefill rule: the attention averaged over the layer's query heads): the learned decisions set each
    head's share of the memory, the query (the question at the end of a prompt) chooses which old tokens fill it.
    Decoding is DMS's either way. (Scored per KV head instead, the old tokens a head keeps were much worse on a
    DMS-trained SmolLM2 at 2k tokens: 5 of 48 passkeys against 37; TOVA per head finds 0 there.)"""
    B, T = q_BTHD.shape[:2]
    K = k_BTKD.shape[2]
    dms, w = cache.dms.replace(mode="hard"), cache.dms.window
    t_T = jnp.arange(T, dtype=jnp.int32)
    a_BTK, q_BTHD = cache._decision(q_BTHD, K, dms, adapter_BTK)
    alpha_BTK, _, z_BTK = decisions(a_BTK, jnp.broadcast_to(t_T == 0, (B, T)), dms, None)
    alpha_BTK = jax.lax.stop_gradient(alpha_BTK)
    L_B11 = lengths_B[:, None, None]
    t_11T = t_T[None, None]
    marked_BKT = jnp.concatenate([alpha_BTK[:, 1:], jnp.zeros_like(alpha_BTK[:, :1])], 1).transpose(0, 2, 1) > 0.5
    marked_BKT &= t_11T + 1 < L_B11
    window_BKT = (t_11T < L_B11) & (L_B11 - 1 - t_11T <= w)
    kept_BKT = ((t_11T < L_B11) & ~marked_BKT) | window_BKT
    if cache.prompt == "dms":
        out_BTHD = dms_core(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, z_BTK, jnp.broadcast_to(t_T, (B, T)), None, rope, dms)
        return out_BTHD, marked_BKT, kept_BKT
    if dms.zeroes_q_after_rope:  # the channel zeroed again in the rotated queries, as dms_core does
        rope = rope_zeroing_queries(rope, q_BTHD.shape[2],
                                    lambda x_BTHD: zero_decision_heads(x_BTHD, K, dms.channel(x_BTHD.shape[-1])))
    out_BTHD, q_BTHD, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
    rows_B1, valid_B1 = ev.last_rows(lengths_B, 1)
    score_B1T = jnp.mean(ev.group_probs(q_BTHD, k_BTKD, rows_B1, valid_B1)[:, :, 0], axis=1, keepdims=True)
    priority_BKT = jnp.where(window_BKT, 2.0, jnp.where(t_11T < L_B11, score_B1T, -1.0))
    rank_BKT = jnp.argsort(jnp.argsort(-priority_BKT, axis=-1, stable=True), axis=-1, stable=True)
    count_BK = jnp.sum(kept_BKT, axis=-1)
    return out_BTHD, marked_BKT & window_BKT, rank_BKT < count_BK[..., None]


def check_prompt(method: str, prompt) -> None:
    if prompt not in PROMPTS:
        raise UserError(f"cache.{method}.prompt must be one of {', '.join(PROMPTS)} ('dms': what DMS keeps token by "
                        f"token; 'query': each head's DMS share filled by the last prompt token's attention); "
                        f"got {prompt!r}")


def _write(state: dict, layer, values: dict) -> dict:
    """state with layer `layer` of each named leaf replaced by values[name] (the paged DMS cache uses it too)."""
    new = dict(state)
    for name, x in values.items():
        new[name] = jax.lax.dynamic_update_slice(state[name], x[None].astype(state[name].dtype),
                                                 (layer,) + (0,) * x.ndim)
    return new


@dataclasses.dataclass(frozen=True)
class DMSCache(RowOps):
    """DMS inference: learned decisions, delayed eviction, a budget-sized buffer whose freed slots are reused."""

    layout = StateLayout(fills={"pos": -1, "evict_at": NEVER}, kept=("overflow", "lost"))

    dms: DMSConfig = DMSConfig()
    capacity: int = 0
    target_cr: float = 0.0
    margin: float = 1.25
    on_overflow: str = "error"
    threshold: float = 0.0
    prompt: str = "dms"  # PROMPTS: what a prompt leaves in the cache, DMS's own pass or chosen by the query
    name: str = "dms"
    reads_adapter = True  # llama.py passes a DMS adapter's logits (adapter_BTK; T = 1 at decode) when there is one

    def __post_init__(self):
        check_sizing("dms", "capacity", self.capacity, self.target_cr, self.margin, self.on_overflow, OVERFLOW)
        if not math.isfinite(self.threshold):
            raise UserError(f"cache.dms.threshold must be a finite number; got {self.threshold}")
        check_prompt("dms", self.prompt)

    def _decision(self, q_BTHD, K: int, dms: DMSConfig, adapter_BTK=None):
        """read_decision with the serving threshold: a token is marked when its logit exceeds `threshold`."""
        a_BTK, q_BTHD = read_decision(q_BTHD, K, dms, adapter_BTK)
        return a_BTK - self.threshold, q_BTHD

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        self.dms.check_context(cfg.max_seq_len, "the model's context (model.max_seq_len)")
        C = capacity_for(max_tokens, self.dms.window, self.capacity, self.target_cr, self.margin)
        L, K, Dh = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim
        shape = (L, batch, K, C)
        return {"k": jnp.zeros(shape + (Dh,), cfg.dtype), "v": jnp.zeros(shape + (Dh,), cfg.dtype),
                "pos": jnp.full(shape, -1, jnp.int32), "evict_at": jnp.full(shape, NEVER, jnp.int32),
                "last": jnp.zeros((L, batch, K), jnp.int32), "overflow": jnp.zeros((L, batch, K), jnp.int32),
                "lost": jnp.zeros((L, batch, K), jnp.int32)}

    # ----------------------------------------------------------------------------------------------- decode
    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn, adapter_BTK=None):
        B, K, Dh = k_BKD.shape
        dms = self.dms.replace(mode="hard")
        a_B1K, q_B1HD = self._decision(q_BHD[:, None], K, dms, adapter_BTK)  # adapter_BTK: [B, 1, K]
        mark_BK = (a_B1K[:, 0] > 0) & (positions_B > 0)[:, None]  # the previous token leaves after the window
        q_BHD = rope(q_B1HD, positions_B[:, None])[:, 0]
        if dms.zeroes_q_after_rope:
            q_BHD = zero_decision_heads(q_BHD, K, dms.channel(Dh))
        k_BKD = rope(k_BKD[:, None], positions_B[:, None])[:, 0]
        pos_BKC, evict_BKC, last_BK = state["pos"][layer], state["evict_at"][layer], state["last"][layer]
        C = pos_BKC.shape[-1]
        t_B11 = positions_B[:, None, None]
        slot_1KC = jnp.arange(C)[None, None]
        evict_BKC = jnp.where(mark_BK[..., None] & (slot_1KC == last_BK[..., None]) & (pos_BKC >= 0),
                              t_B11 + self.dms.window, evict_BKC)
        gone_BKC = (pos_BKC >= 0) & (evict_BKC <= t_B11)
        pos_BKC = jnp.where(gone_BKC, -1, pos_BKC)
        evict_BKC = jnp.where(gone_BKC, NEVER, evict_BKC)
        free_BKC = pos_BKC < 0
        full_BK = ~jnp.any(free_BKC, axis=-1)
        # Overflow: the marked token closest to leaving goes early, else the oldest token (counted, never silent).
        victim_BK = jnp.argmin(jnp.where(evict_BKC < NEVER, evict_BKC, NEVER - C + pos_BKC), axis=-1)
        slot_BK = jnp.where(full_BK, victim_BK, jnp.argmax(free_BKC, axis=-1)).astype(jnp.int32)
        take_BKC = slot_1KC == slot_BK[..., None]
        pos_BKC = jnp.where(take_BKC, t_B11, pos_BKC)
        evict_BKC = jnp.where(take_BKC, NEVER, evict_BKC)
        state = _write(state, layer, {"pos": pos_BKC, "evict_at": evict_BKC, "last": slot_BK,
                                      "overflow": state["overflow"][layer] + full_BK.astype(jnp.int32)})
        b_BK, k_BK = jnp.meshgrid(jnp.arange(B), jnp.arange(K), indexing="ij")
        at = (layer, b_BK, k_BK, slot_BK)
        state["k"] = state["k"].at[at].set(k_BKD.astype(state["k"].dtype))
        state["v"] = state["v"].at[at].set(v_BKD.astype(state["v"].dtype))
        out_BHD = decode_attention(q_BHD, state["k"][layer], state["v"][layer], pos_BKC >= 0)
        return out_BHD, state

    # ---------------------------------------------------------------------------------------------- prefill
    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn, adapter_BTK=None):
        B, T = q_BTHD.shape[:2]
        K = k_BTKD.shape[2]
        w = self.dms.window
        out_BTHD, marked_BKT, kept_BKT = prefill_kept(self, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope, adapter_BTK)
        t_T = jnp.arange(T, dtype=jnp.int32)
        positions_BT = jnp.broadcast_to(t_T, (B, T))
        t_11T = t_T[None, None]
        C = state["k"].shape[3]
        rank_BKT = jnp.cumsum(kept_BKT, axis=-1, dtype=jnp.int32) - 1
        slot_BKT = jnp.where(kept_BKT & (rank_BKT < C), rank_BKT, C)  # C: out of range, dropped
        count_BK = jnp.sum(kept_BKT, axis=-1, dtype=jnp.int32)
        b_BKT = jnp.broadcast_to(jnp.arange(B)[:, None, None], slot_BKT.shape)
        kh_BKT = jnp.broadcast_to(jnp.arange(K)[None, :, None], slot_BKT.shape)
        k_BKTD = jnp.swapaxes(rope(k_BTKD, positions_BT), 1, 2)
        scatter = lambda dst, src: dst.at[b_BKT, kh_BKT, slot_BKT].set(src.astype(dst.dtype), mode="drop")
        layer_state = {name: state[name][layer] for name in ("k", "v", "pos", "evict_at")}
        new = {"k": scatter(jnp.zeros_like(layer_state["k"]), k_BKTD),
               "v": scatter(jnp.zeros_like(layer_state["v"]), jnp.swapaxes(v_BTKD, 1, 2)),
               "pos": scatter(jnp.full_like(layer_state["pos"], -1), jnp.broadcast_to(t_11T, slot_BKT.shape)),
               "evict_at": scatter(jnp.full_like(layer_state["evict_at"], NEVER),
                                   jnp.where(marked_BKT, t_11T + w + 1, NEVER)),
               "last": jnp.clip(count_BK - 1, 0, C - 1), "lost": jnp.maximum(count_BK - C, 0),
               "overflow": jnp.zeros_like(count_BK)}
        return out_BTHD, _write(state, layer, new)

    # ------------------------------------------------------------------------------------------------ stats
    def stats(self, state, tokens_B):
        L, B, K, C, Dh = state["k"].shape
        kept_LBK = jnp.sum(state["pos"] >= 0, axis=-1).astype(jnp.float32)
        tokens_B = jnp.asarray(tokens_B)
        seen_LBK = jnp.broadcast_to(tokens_B[None, :, None], (L, B, K)).astype(jnp.float32)
        allocated = state_bytes(state)
        per_slot = allocated // (L * B * K * C)
        return {"tokens_B": tokens_B, "kept_LBK": kept_LBK, "overflow_LBK": state["overflow"] + state["lost"],
                "compression_ratio_LBK": seen_LBK / jnp.maximum(kept_LBK, 1.0),
                "compression_ratio": jnp.sum(seen_LBK) / jnp.maximum(jnp.sum(kept_LBK), 1.0),
                "capacity": C, "bytes_allocated": allocated, "bytes_in_use": jnp.sum(kept_LBK) * per_slot}

    def check(self, state) -> None:
        """UserError naming the first (layer, head) that ran out of slots (decode overflow allowed with 'evict')."""
        check_buffer(state, "DMS cache", "slots for the prompt tokens it keeps", "tokens",
                     "raise cache.dms.capacity or cache.dms.margin, or lower cache.dms.target_cr",
                     "cache.dms.on_overflow='evict'", self.on_overflow == "evict")


def _check_sequences(section, config) -> None:
    """A window not shorter than the training sequences would evict nothing."""
    if "data" in config:
        from_section(section).check_context(config.data.seq_len, "data.seq_len")


def _other_cache(section):
    """A DMS model served by another cache method: the decision channel of each group's first query head zeroed
    (as DMSAttention without eviction); an adapter model's q carries no decision, so it needs nothing."""
    dms = from_section(section)
    if dms.decision != "q_channel":
        return None
    return functools.partial(ZeroedChannel, channel=dms.decision_channel, first_of_group=True, keys=False,
                             after_rope=dms.zeroes_q_after_rope)


# What a DMS model carries (its `dms` section: window, decision channel, scale, offset, target CR) and how it is
# trained (dmc_jax.dms.objective, distillation through the `distill` section).
TRAINED = registry.TrainedMethod(
    section="dms", defaults=lambda: default_section().to_dict(), validate=validate_section,
    objective="dmc_jax.dms.objective:make", evaluate="dmc_jax.dms.objective:eval_attention", serve_method="dms",
    engine_method="dms_paged", validate_run=_check_sequences, prepare_model="dmc_jax.dms.objective:with_adapter",
    other_cache=_other_cache)

registry.register(registry.MethodSpec(
    name="dms", trained=TRAINED, sized_by_cr=True,
    defaults={"capacity": 0, "target_cr": 0.0, "margin": 1.25, "on_overflow": "error", "threshold": 0.0,
              "window": 0, "prompt": "dms"},
    build=lambda s, hparams: DMSCache(served(from_section(hparams), s.window), capacity=s.capacity,
                                      target_cr=s.target_cr, margin=s.margin, on_overflow=s.on_overflow, threshold=float(s.threshold),
                                      prompt=s.prompt),
    summary="Dynamic Memory Sparsification: learned delayed eviction (Lancucki et al., NeurIPS 2025)"))
