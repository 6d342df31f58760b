"""DMS decisions with query-aware eviction (`dms_tova`): a DMS model's learned marks say WHICH tokens may leave, the
current query (TOVA's score) says WHEN and which of them.

A DMS cache (dms.py, dms_paged.py) evicts a token w steps after its decision marked it, whatever comes later: on a
DMS-trained SmolLM2 at 2k tokens and CR 8 a passkey marked on arrival is gone before the question that needs it,
and TOVA on the same weights, which re-ranks by the current query at every step, finds more keys (95 of 192 against
70). This cache keeps the learned decisions but lets them wait: a fixed budget of C slots per (layer, sequence, KV
head), as the eviction policies (the same bytes as TOVA at the same budget), and a token leaves only when the buffer
is full and a new token needs its slot. Which one, in tiers:
    0. a marked token whose DMS window is over (DMS would already have evicted it),
    1. a marked token still inside its window (t - 1 - p < w),
    2. an unmarked token (the model wants it kept), the new token included;
the lowest tier present, and within it the candidate the current query attends to least (TOVA's score, per KV head:
the mean attention of its query heads). A drop from tier 1 or 2 is counted in `overflow` (the budget was too small
for what the model keeps; TOVA's rule chose). With threshold -> -inf every token is marked: per-head TOVA (plus the
DMS model's channel zeroing); with a budget that never fills nothing is evicted: the DMS model with nothing
compressed.

Prefill attends over the whole prompt (the dense cache's computation, as every eviction policy here), marks token j
from the decision of token j + 1 (the serving threshold applies), then keeps the C best tokens of each head by the
same tiers, ranked within a tier by the last prompt token's attention (TOVA's prefill rule).

State (the eviction policies' buffers, eviction_common.py, plus):
    marked    [L, B, K, C]  the slot's token was marked by the decision of the token after it
    last      [L, B, K]     slot of the newest token (the next decision marks it), -1 = it was not kept
    overflow  [L, B, K]     tokens dropped from tier 1 or 2 (counted; never an error: the budget is the policy's)

Shape letters: L layers, B batch, K KV heads, C slots, X = C + 1 decode candidates, T prompt time, H query heads,
Dh head dim.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import registry
from dmc_jax.cache.dms import TRAINED
from dmc_jax.cache.protocol import RopeFn, RowOps, StateLayout
from dmc_jax.dms.config import DMSConfig, from_section, served
from dmc_jax.dms.decisions import read_decision, zero_decision_heads
from dmc_jax.errors import UserError, require
from dmc_jax.model.config import ModelConfig

EXPIRED, MARKED, KEPT = 0, 1, 2  # eviction tiers: the lowest present goes first


def tiers(marked, pos, t, window: int):
    """Tier of each token (any shape) when token t is processed: EXPIRED if marked and out of its window (DMS evicts a
    token at position p, marked by the decision of p + 1, at step p + 1 + w: pos <= t - 1 - w), MARKED if marked and
    still inside it, else KEPT."""
    expired = marked & (pos <= t - 1 - window)
    return jnp.where(expired, EXPIRED, jnp.where(marked, MARKED, KEPT))


@dataclasses.dataclass(frozen=True)
class DMSTOVACache(RowOps):
    """DMS's learned marks, evicted lazily by the current query's attention within a budget of C slots per head."""

    layout = StateLayout(fills={"pos": -1, "valid": False, "last": -1}, kept=("overflow",))

    dms: DMSConfig = DMSConfig()
    budget: int = 256       # slots per layer, sequence and KV head
    threshold: float = 0.0  # the DMS caches' serving threshold: a token is marked when its decision logit exceeds it
    name: str = "dms_tova"
    reads_adapter = True    # llama.py passes a DMS adapter's logits (adapter_BTK; T = 1 at decode) when there is one

    def __post_init__(self):
        require(self.budget >= 1, f"cache.budget must be >= 1; got {self.budget}")
        if not math.isfinite(self.threshold):
            raise UserError(f"cache.dms_tova.threshold must be a finite number; got {self.threshold}")

    def init(self, cfg: ModelConfig, batch: int, max_tokens: int):
        self.dms.check_context(cfg.max_seq_len, "the model's context (model.max_seq_len)")
        state = ev.init_buffers(cfg, batch, min(self.budget, max_tokens), {"marked": (bool, False)})
        shape = (cfg.num_layers, batch, cfg.num_kv_heads)
        return dict(state, last=jnp.full(shape, -1, jnp.int32), overflow=jnp.zeros(shape, jnp.int32))

    def _marks(self, q_BTHD, K: int, adapter_BTK=None):
        """(marks_BTK: token t's decision marks token t - 1, q with the decision channel zeroed before RoPE)."""
        a_BTK, q_BTHD = read_decision(q_BTHD, K, self.dms.replace(mode="hard"), adapter_BTK)
        return a_BTK - self.threshold > 0, q_BTHD

    def _rope(self, rope: RopeFn, H: int, K: int) -> RopeFn:
        """RoPE, then the decision channel zeroed again in the rotated queries (as DMSAttention, zero_after_rope)."""
        if not self.dms.zeroes_q_after_rope:
            return rope

        def rotated(x_BTND, positions_BT):
            out_BTND = rope(x_BTND, positions_BT)
            if out_BTND.shape[-2] != H:
                return out_BTND
            return zero_decision_heads(out_BTND, K, self.dms.channel(out_BTND.shape[-1]))

        return rotated

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope: RopeFn, adapter_BTK=None):
        B, T, H, _ = q_BTHD.shape
        K = k_BTKD.shape[2]
        marks_BTK, q_BTHD = self._marks(q_BTHD, K, adapter_BTK)
        out_BTHD, q_BTHD, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, self._rope(rope, H, K))
        t_11T = jnp.arange(T, dtype=jnp.int32)[None, None]
        L_B11 = lengths_B[:, None, None]
        marked_BKT = jnp.concatenate([marks_BTK[:, 1:], jnp.zeros_like(marks_BTK[:, :1])], 1).transpose(0, 2, 1)
        marked_BKT &= t_11T + 1 < L_B11  # the last prompt token is marked (or not) by the first decoded one
        tier_BKT = tiers(marked_BKT, t_11T, L_B11 - 1, self.dms.window)  # as DMS holds after token L - 1
        rows_B1, valid_B1 = ev.last_rows(lengths_B, 1)
        score_BKT = ev.group_probs(q_BTHD, k_BTKD, rows_B1, valid_B1)[:, :, 0]  # in [0, 1]
        C = state["k"].shape[3]
        kept = ev.keep_top(2.0 * tier_BKT + score_BKT, lengths_B, C, k_BTKD, v_BTKD, {"marked": marked_BKT})
        kept["marked"] = kept["marked"].astype(bool) & kept["valid"]
        unexpired_BK = jnp.sum((tier_BKT > EXPIRED) & (t_11T < L_B11), axis=-1, dtype=jnp.int32)
        newest_BKC = kept["pos"] == (lengths_B - 1)[:, None, None]
        kept["last"] = jnp.where(jnp.any(newest_BKC, -1), jnp.argmax(newest_BKC, -1), -1).astype(jnp.int32)
        kept["overflow"] = jnp.maximum(unexpired_BK - C, 0)
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope: RopeFn, adapter_BTK=None):
        B, H, _ = q_BHD.shape
        K = k_BKD.shape[1]
        marks_B1K, q_B1HD = self._marks(q_BHD[:, None], K, adapter_BTK)
        C = state["k"].shape[3]
        # 1. The decision of token t marks t - 1 (if its slot still holds it).
        last_BK = state["last"][layer]
        mark_BK = marks_B1K[:, 0] & (positions_B > 0)[:, None] & (last_BK >= 0)
        marked_BKC = state["marked"][layer] | (mark_BK[..., None] & (jnp.arange(C) == last_BK[..., None]))
        state = ev.write_layer(state, layer, {"marked": marked_BKC})
        # 2. Attend over the slots and the new token (held outside a full buffer), then drop by tier and score.
        out_BHD, state, step = ev.begin_decode(state, layer, q_B1HD[:, 0], k_BKD, v_BKD, positions_B,
                                               self._rope(rope, H, K), fresh={"marked": False})
        marked_BKX = jnp.concatenate([state["marked"][layer], jnp.zeros((B, K, 1), bool)], axis=-1)
        tier_BKX = tiers(marked_BKX, step.pos_BKX, positions_B[:, None, None], self.dms.window)
        drop_BK = ev.masked_argmin(2.0 * tier_BKX + step.probs_BKX, step.valid_BKX)
        forced_BK = step.full_BK & (jnp.take_along_axis(tier_BKX, drop_BK[..., None], -1)[..., 0] > EXPIRED)
        state = ev.finish_decode(state, layer, step, drop_BK, {"marked": marked_BKX})
        newest_BKC = state["pos"][layer] == positions_B[:, None, None]
        last_BK = jnp.where(jnp.any(newest_BKC, -1), jnp.argmax(newest_BKC, -1), -1).astype(jnp.int32)
        return out_BHD, ev.write_layer(state, layer, {"last": last_BK,
                                                      "overflow": state["overflow"][layer] + forced_BK})

    def stats(self, state, tokens_B):
        return dict(ev.buffer_stats(state, tokens_B), overflow_LBK=state["overflow"])


registry.register(registry.MethodSpec(
    name="dms_tova", trained=TRAINED, budgeted=True, defaults={"threshold": 0.0, "window": 0},
    build=lambda s, hparams: DMSTOVACache(served(from_section(hparams), s.window), budget=s.budget,
                                          threshold=float(s.threshold)),
    summary="a DMS model's learned marks, evicted lazily by the current query's attention (TOVA) in a fixed budget"))
