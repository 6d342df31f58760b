"""lm-evaluation-harness backend `dmc_jax`: any model we load, with any cache method, scored THROUGH the cache.

    lm_eval --model dmc_jax --model_args source=smollm2,cache=h2o,ratio=4 --tasks ... --batch_size 8

Every request is prefilled with the cache method (which compresses its context as its prefill rule says), then its
continuation is decoded token by token through the compressed cache (`cache_scoring.score_continuations`), as task
compare's decoded perplexity and multiple choice do. loglikelihood_rolling splits a text into lm-eval's disjoint
windows of max_length tokens, each a one-token prompt (BOS, else EOS) and a continuation decoded through the
cache; generate_until prefills the prompt and generates through the cache (`inference.generate`). Requests are
grouped by padded shape and method and run `batch_size` rows at a time (one compilation per group shape);
contexts and continuations are padded to geometric buckets from `context_pad` and `continuation_pad` tokens (larger
values: fewer shapes to compile, more padding to compute).

The method's compression is measured, not assumed: `get_model_info()` (results["config"]["dmc_jax"]) holds, per
request type, the tokens the cache received, the entries it kept at the end of each request (summed over layers
and KV heads), their ratio (the logical CR) and the cache bytes allocated per sequence.

model_args: source (required), cache (default dense), ratio or budget (budgeted eviction caches), budget_step,
max_length, dtype, seed, add_bos, max_gen_toks, context_pad, continuation_pad, and the cache's own fields
(lm_eval_model.cache_fields: budget, and cache.<method>.<field> by its name; older flat names accepted).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from typing import Optional

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dmc_jax.cache.protocol import state_bytes
from dmc_jax.errors import UserError
from dmc_jax.evaluation import lm_eval_model
from dmc_jax.evaluation.cache_scoring import score_continuations



def bucket(n: int, smallest: int) -> int:
    """The padded length for n: smallest * 2^k or smallest * 1.5 * 2^k (padding wastes at most a third)."""
    size = smallest
    while n > size * 3 // 2:
        size *= 2
    return size if n <= size else size * 3 // 2


class ModelArgsError(UserError, SystemExit):
    """Bad model_args. Also a SystemExit so that the lm_eval command, which has no error handling of its own for
    backends, ends with this one line (and exit status 1) instead of a traceback; Python callers catch UserError."""

    def __init__(self, message: str):
        UserError.__init__(self, message)
        self.code = f"error: {message}"


class _Meter:
    """Tokens received and entries kept per request type, for the CR and bytes reported with the results."""

    def __init__(self):
        self.tokens = defaultdict(float)
        self.kept = defaultdict(float)
        self.bytes = defaultdict(list)
        self.requests = defaultdict(int)

    def add(self, kind: str, tokens: int, kept: float, heads: int, bytes_per_seq: float):
        self.tokens[kind] += tokens * heads
        self.kept[kind] += kept
        self.bytes[kind].append(bytes_per_seq)
        self.requests[kind] += 1

    def report(self) -> dict:
        return {kind: {"requests": self.requests[kind], "compression_ratio": self.tokens[kind] / self.kept[kind],
                       "cache_bytes_allocated_per_sequence": float(np.mean(self.bytes[kind]))}
                for kind in self.requests if self.kept[kind] > 0}


@register_model("dmc_jax")
class DmcJaxLM(TemplateLM):
    """lm-eval LM over a dmc_jax model and cache method (see the module docstring for model_args)."""

    def __init__(self, source: Optional[str] = None, cache: str = "dense", batch_size=8, add_bos=False,
                 max_gen_toks=256, context_pad=16, continuation_pad=4, device=None, max_batch_size=None, **kwargs):
        super().__init__()
        del device, max_batch_size  # JAX places arrays on its default device; batches have a fixed size
        try:
            self.batch_size = self._batch_size(batch_size)
            self.add_bos = lm_eval_model.typed("add_bos", add_bos, False)
            self.max_gen_toks = lm_eval_model.typed("max_gen_toks", max_gen_toks, 1)
            self.pads = tuple(lm_eval_model.typed(k, v, 1) for k, v in (("context_pad", context_pad),
                                                                        ("continuation_pad", continuation_pad)))
            if min(self.pads + (self.max_gen_toks,)) < 1:
                raise UserError("model_args context_pad, continuation_pad and max_gen_toks must be >= 1")
            self.loaded = lm_eval_model.load(source, cache, **kwargs)  # last: loading the weights takes a while
        except UserError as e:
            raise ModelArgsError(str(e)) from None
        self.model = self.loaded.model
        self.tokenizer = self.model.tokenizer
        self.max_length = self.model.cfg.max_seq_len
        self.meter = _Meter()
        self.rng = jax.random.PRNGKey(int(kwargs.get("seed", 0)))

    @staticmethod
    def _batch_size(value) -> int:
        if str(value).startswith("auto"):  # no memory probing: the fixed default
            return 8
        size = lm_eval_model.typed("batch_size", value, 1)
        if size < 1:
            raise UserError(f"batch_size={size} must be >= 1")
        return size

    # ------------------------------------------------------------------------------------------ lm-eval interface

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return f"dmc_jax:{self.model.source}"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        bos = self.add_bos if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_bos=bos)

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """--apply_chat_template: the model's own template (from its tokenizer files / GGUF)."""
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template=False) -> str:
        return self.tokenizer_name if chat_template else ""

    def get_model_info(self) -> dict:
        return {"dmc_jax": {**self.loaded.description, "cache_stats": self.meter.report()}}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, kind: str = "loglikelihood"):
        scored = self._score([(ctx, cont) for _, ctx, cont in requests], kind)
        for (key, _, _), answer in zip(requests, scored):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        self._log_stats(kind)
        return scored

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            tokens = self.tok_encode(req.args[0], add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    tokens, self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scored = self._loglikelihood_tokens(windows, kind="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scored):
            totals[i] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from dmc_jax.evaluation.lm_eval_generate import generate_requests

        out = generate_requests(self, [req.args for req in requests])
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        self._log_stats("generate_until")
        return out

    # ------------------------------------------------------------------------------------------------- scoring

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Left-truncates so that the tokens that score the continuation (all but its last) fit max_length, as
        lm-eval's HF backend does."""
        if len(ctx) + len(cont) <= self.max_length + 1:
            return ctx, cont
        cont = cont[-self.max_length:]
        return ctx[-(self.max_length + 1 - len(cont)):], cont

    def _score(self, pairs: list[tuple[list[int], list[int]]], kind: str) -> list[tuple[float, bool]]:
        """(summed log-prob, greedy) of each (context ids, continuation ids), decoded through the cache."""
        groups = defaultdict(list)
        for i, (ctx, cont) in enumerate(pairs):
            ctx, cont = self._fit(ctx, cont)
            method = self.loaded.method_for(len(ctx) + len(cont))
            groups[(bucket(len(ctx), self.pads[0]), bucket(len(cont), self.pads[1]), method)].append((i, ctx, cont))
        out: list = [None] * len(pairs)
        for (T, N, method), rows in groups.items():
            rows.sort(key=lambda r: -(len(r[1]) + len(r[2])))
            for s in range(0, len(rows), self.batch_size):
                self._score_batch(rows[s:s + self.batch_size], T, N, method, kind, out)
        return out

    def _score_batch(self, chunk, T: int, N: int, method, kind: str, out: list) -> None:
        B = self.batch_size  # a fixed batch shape: one compilation per (T, N, method)
        prompt_BT = np.zeros((B, T), np.int32)
        lengths_B = np.ones(B, np.int32)
        cont_BN = np.zeros((B, N), np.int32)
        cont_len_B = np.zeros(B, np.int32)
        for b, (_, ctx, cont) in enumerate(chunk):
            prompt_BT[b, :len(ctx)], lengths_B[b] = ctx, len(ctx)
            cont_BN[b, :len(cont)], cont_len_B[b] = cont, len(cont)
        logp_BN, greedy_BN, kept_LBK, state = score_continuations(
            self.model.params, prompt_BT, lengths_B, cont_BN, cont_len_B, method, self.model.cfg)
        if hasattr(method, "check"):  # a DMC cache that ran out of room says so instead of scoring garbage
            method.check(state)
        logp_BN, greedy_BN, kept_LBK = np.asarray(logp_BN), np.asarray(greedy_BN), np.asarray(kept_LBK)
        heads = kept_LBK.shape[0] * kept_LBK.shape[2]
        per_seq = state_bytes(state) / B
        for b, (i, ctx, cont) in enumerate(chunk):
            out[i] = (float(logp_BN[b].sum()), bool(greedy_BN[b, :len(cont)].all()))
            self.meter.add(kind, len(ctx) + len(cont) - 1, float(kept_LBK[:, b].sum()), heads, per_seq)

    def _log_stats(self, kind: str) -> None:
        stats = self.meter.report().get(kind)
        if stats:  # printed: lm-eval's logging setup shows only its own loggers
            print(f"[dmc_jax] {kind} through cache {self.loaded.description['cache']}: {stats['requests']} requests, "
                  f"compression ratio {stats['compression_ratio']:.2f}, "
                  f"{stats['cache_bytes_allocated_per_sequence'] / 2**20:.2f} MB cache per sequence",
                  file=sys.stderr, flush=True)
