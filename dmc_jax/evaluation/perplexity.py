"""Perplexity of a text under a model, by sliding windows with a stride (each token scored once).

Window i covers tokens [i * stride, i * stride + W) and scores the targets the previous windows did not (never
its own first token, which has no context). With stride < W every token after the first is scored exactly once,
with at least W - stride tokens of context; with stride = W the windows are independent chunks whose first tokens
serve only as context. Reports perplexity, tokens scored and bits per byte (nats / ln 2 / UTF-8 bytes of the
scored tokens).

Shape letters: B windows per batch, W window length, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params


@dataclasses.dataclass
class PerplexityResult:
    perplexity: float
    nll_nats: float
    tokens_scored: int
    bytes_scored: int
    bits_per_byte: float
    windows: int
    compression_ratio: float = 1.0  # tokens per kept KV slot implied by the decisions (1 for vanilla)
    compression_ratio_layer_head: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def windows(num_tokens: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of each window; targets [first, end) are scored in that window."""
    if window < 2:
        raise UserError(f"eval.window must be >= 2, got {window}")
    if not 0 < stride <= window:
        raise UserError(f"eval.stride must be in [1, eval.window={window}], got {stride}")
    out, scored_to, begin = [], 1, 0
    while scored_to < num_tokens:
        end = min(begin + window, num_tokens)
        first = max(begin + 1, scored_to)
        if first < end:
            out.append((begin, end, first))
        scored_to = end
        begin += stride
    return out


@functools.partial(jax.jit, static_argnames=("cfg", "attention"))
def _window_nll(params: Params, tokens_BW, score_BW, cfg: ModelConfig, attention):
    """(summed next-token NLL where score_BW (a mask on targets) is set, merge decisions summed over the scored
    positions [L, K] (zeros when the attention makes none))."""
    logits_BWV, aux = llama.forward_aux(params, tokens_BW[:, :-1], cfg, attention=attention)
    logp_BWV = jax.nn.log_softmax(logits_BWV, axis=-1)
    nll_BW = -jnp.take_along_axis(logp_BWV, tokens_BW[:, 1:, None], axis=-1)[..., 0]
    nll = jnp.sum(jnp.where(score_BW[:, 1:], nll_BW, 0.0))
    if not isinstance(aux, dict) or "alpha_BTK" not in aux:
        return nll, jnp.zeros((cfg.num_layers, cfg.num_kv_heads))
    # decisions of the tokens whose prediction is scored (the token at t predicts t + 1)
    return nll, jnp.einsum("lbtk,bt->lk", aux["alpha_BTK"], score_BW[:, 1:].astype(jnp.float32))


def perplexity(params: Params, ids: Sequence[int], cfg: ModelConfig, window: int, stride: int, batch: int = 1,
               decode: Callable[[Sequence[int]], str] | None = None, pad_id: int = 0,
               attention: llama.SequenceAttention = llama.causal_attention) -> PerplexityResult:
    """Sliding-window perplexity of token ids; `decode` (ids -> text) gives bits per byte.

    `attention` is the model's SequenceAttention: vanilla, or DMC's form in hard mode, which sees exactly the slots
    the DMC inference cache keeps (tests/test_dmc_cache.py), so its perplexity is the compressed model's; the
    merge rate of its decisions over the scored tokens gives the compression ratio per layer and KV head.
    """
    if len(ids) < 2:
        raise UserError(f"the text has {len(ids)} token(s); perplexity needs at least 2")
    if window > cfg.max_seq_len:
        raise UserError(f"eval.window={window} exceeds model.max_seq_len={cfg.max_seq_len}; lower eval.window")
    ids_np = np.asarray(ids, np.int32)
    wins = windows(len(ids_np), window, stride)
    W = min(window, len(ids_np))
    total, merges_LK = 0.0, np.zeros((cfg.num_layers, cfg.num_kv_heads))
    for i in range(0, len(wins), batch):
        chunk = wins[i:i + batch]
        tokens_BW = np.full((len(chunk), W), pad_id, np.int32)
        score_BW = np.zeros((len(chunk), W), bool)
        for b, (begin, end, first) in enumerate(chunk):
            tokens_BW[b, :end - begin] = ids_np[begin:end]
            score_BW[b, first - begin:end - begin] = True
        nll, merged_LK = _window_nll(params, tokens_BW, score_BW, cfg, attention)
        total += float(nll)
        merges_LK += np.asarray(merged_LK)
    scored_ids = [int(ids_np[t]) for _, end, first in wins for t in range(first, end)]
    scored = len(scored_ids)
    n_bytes = len(decode(scored_ids).encode("utf-8")) if decode else 0
    cr_LK = 1.0 / np.maximum(1.0 - merges_LK / scored, 1e-6)
    return PerplexityResult(perplexity=math.exp(total / scored), nll_nats=total, tokens_scored=scored,
                            bytes_scored=n_bytes, windows=len(wins),
                            bits_per_byte=(total / math.log(2) / n_bytes) if n_bytes else float("nan"),
                            compression_ratio=float(1.0 / max(1.0 - merges_LK.mean() / scored, 1e-6)),
                            compression_ratio_layer_head=cr_LK.tolist())
