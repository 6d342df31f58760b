"""The serving threshold that makes a trained DMS model fill a cache of a given size.

Training reaches its CR target only on average and one-sidedly (the compression loss is zero once the model evicts
at least as much as asked), so a model often evicts more than its serving pool has room to keep: the pool's bytes
are paid for and partly idle. A serving threshold t marks a token when its decision logit exceeds t (cache.dms.
threshold / cache.dms_paged.threshold: positive keeps more). This module picks the t whose kept tokens fill a
target number of slots per head, on calibration text (never the evaluation text): the token-by-token cache keeps,
after the last of T tokens, the w + 1 most recent tokens of each head and every older token j whose successor's
logit a_{j+1} does not exceed t, exactly DMS's hard parallel form (tests/test_dms.py; the count below:
tests/test_dms_calibrate.py), so

    kept(t) = T - #{ j < T - 1 - w : a_{j+1} > t }        per (layer, row, KV head)

is counted from the decision logits of one hard-form forward pass. The logits of deeper layers depend on what the
earlier layers evicted, i.e. on t itself, so the pass is repeated at the chosen threshold (`rounds`, default 2)
and the threshold chosen again from the logits of the last pass. What a head keeps never shrinks within a
sequence, so the count after the last token is the most the cache holds.

Shape letters: L layers, N rows, T tokens, K KV heads.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import DMSConfig
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Calibration:
    threshold: float          # the serving threshold chosen
    kept_per_head: float      # mean tokens kept per (layer, row, KV head) after the last token, at `threshold`
    target_kept: float        # what it aimed at (<=)
    tokens: int               # T
    rows: int                 # N
    passes: list              # [(threshold of the pass, kept per head it measured there)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def _logits_of_decisions(params, tokens_1T, cfg: ModelConfig, attention: DMSAttention):
    """[L, 1, T, K] the decision logits of one row in DMS's hard form (relative to the attention's threshold)."""
    _, aux = llama.forward_aux(params, tokens_1T, cfg, attention=attention, rng=None)
    return aux["a_BTK"]


def decision_logits(params, cfg: ModelConfig, dms: DMSConfig, rows_NT: np.ndarray, threshold: float) -> np.ndarray:
    """[L, N, T, K] fp32: each token's decision logit minus `threshold`, from DMS's hard parallel form served at
    that threshold (a token is marked when its value is > 0)."""
    attention = DMSAttention(dms.replace(mode="hard", decision_offset=dms.decision_offset + float(threshold)))
    return np.concatenate([np.asarray(_logits_of_decisions(params, jnp.asarray(row[None]), cfg, attention))
                           for row in np.asarray(rows_NT, np.int32)], axis=1)


def kept_per_head(a_LNTK: np.ndarray, window: int, shift: float = 0.0) -> np.ndarray:
    """[L, N, K] tokens each head keeps after the last of T tokens when the threshold moves up by `shift` from the
    one a_LNTK is relative to."""
    T = a_LNTK.shape[2]
    older = a_LNTK[:, :, 1:max(T - window, 1)]  # a_{j+1} for j < T - 1 - w (outside the window at the end)
    return T - (older > shift).sum(axis=2)


def _shift_for(a_LNTK: np.ndarray, window: int, target_kept: float) -> float:
    """The largest threshold shift whose mean kept tokens per head is <= target_kept (mid-way between logits)."""
    T = a_LNTK.shape[2]
    older = np.sort(a_LNTK[:, :, 1:max(T - window, 1)].reshape(-1))[::-1]  # descending
    heads = a_LNTK.shape[0] * a_LNTK.shape[1] * a_LNTK.shape[3]
    need = int(math.ceil(heads * (T - target_kept) - 1e-9))  # marked tokens needed over all heads
    if need <= 0:
        return float(older[0]) + 1.0 if older.size else 0.0  # everything fits: mark nothing outside the window
    if need > older.size:
        raise UserError(f"no serving threshold fits {target_kept:.1f} tokens per head: even evicting every token "
                        f"outside the window of {window} keeps {window + 1}; size the pool larger")
    above = float(older[need - 1])  # at least `need` logits are >= this one
    below = float(older[need]) if need < older.size else above - 1.0
    return (above + below) / 2 if below < above else above - 1e-6 * max(1.0, abs(above))


def calibrate(params, cfg: ModelConfig, dms: DMSConfig, rows_NT: np.ndarray, target_kept: float,
              start: float = 0.0, rounds: int = 2) -> Calibration:
    """The serving threshold whose kept tokens per head (mean over layers, rows, KV heads) come closest to
    target_kept from below on rows_NT (module docstring)."""
    rows_NT = np.asarray(rows_NT, np.int32)
    if rows_NT.ndim != 2 or rows_NT.shape[1] <= dms.window + 1:
        raise UserError(f"calibration rows must be [rows, tokens] with more tokens than the window + 1 "
                        f"({dms.window + 1}); got shape {rows_NT.shape}")
    threshold, passes = float(start), []
    for _ in range(max(int(rounds), 1)):
        a_LNTK = decision_logits(params, cfg, dms, rows_NT, threshold)
        passes.append((threshold, float(kept_per_head(a_LNTK, dms.window).mean())))
        threshold = threshold + _shift_for(a_LNTK, dms.window, target_kept)
    kept = float(kept_per_head(a_LNTK, dms.window, threshold - passes[-1][0]).mean())
    return Calibration(threshold=round(threshold, 4), kept_per_head=kept, target_kept=float(target_kept),
                       tokens=int(rows_NT.shape[1]), rows=int(rows_NT.shape[0]), passes=passes)
