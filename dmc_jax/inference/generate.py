"""Batched generation: parallel prefill through a cache method, then a jitted `lax.while_loop` decode.

Prompts of different lengths are right-padded; every sequence decodes at its own position and its cache keeps
its own length, so padding is never attended to. The cache state is donated to both jitted stages.

Shape letters: B batch, T padded prompt length, N new tokens, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache.protocol import CacheMethod, State
from dmc_jax.errors import UserError
from dmc_jax.inference.sampling import SamplingConfig, sample
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params

PROMPT_BUCKET = 64  # prompts are padded to a multiple of this, to bound recompilation


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    max_new_tokens: int = 64
    sampling: SamplingConfig = SamplingConfig()
    stop_ids: tuple = ()
    pad_id: int = 0


@dataclasses.dataclass
class Generation:
    """Generated ids per sequence (stop token included when one was produced) and the final cache."""

    tokens: list
    finished: list  # True where a stop token ended the sequence
    state: State
    lengths: np.ndarray  # tokens seen by the cache per sequence (prompt + fed-back generated tokens)


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, bucket: int = PROMPT_BUCKET):
    """Right-pads prompts into tokens [B, T] (T a multiple of bucket) and lengths [B]."""
    lengths = np.array([len(p) for p in prompts], np.int32)
    T = int(-(-lengths.max() // bucket) * bucket)
    tokens_BT = np.full((len(prompts), T), pad_id, np.int32)
    for b, p in enumerate(prompts):
        tokens_BT[b, :len(p)] = p
    return tokens_BT, lengths


def check_prompts(prompts: Sequence[Sequence[int]], max_new_tokens: int, cfg: ModelConfig) -> None:
    """Raises UserError for an empty batch, an empty prompt, or prompt + new tokens over the model's maximum."""
    if not prompts:
        raise UserError("no prompt given; pass generate.prompt (or a prompts file)")
    if max_new_tokens < 1:
        raise UserError(f"generate.max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty; give at least one token of text")
        if len(p) + max_new_tokens > cfg.max_seq_len:
            raise UserError(f"prompt {i} has {len(p)} tokens; with generate.max_new_tokens={max_new_tokens} it "
                            f"exceeds model.max_seq_len={cfg.max_seq_len}; shorten the prompt or lower "
                            f"generate.max_new_tokens")


@functools.partial(jax.jit, static_argnames=("method", "cfg", "gen"), donate_argnames=("state",))
def prefill_and_sample(params: Params, tokens_BT, lengths_B, state, rng, method: CacheMethod, cfg: ModelConfig,
                       gen: GenerateConfig):
    """Prefill, then the first new token of every sequence; returns (first_B, state)."""
    logits_BV, state = llama.prefill(params, tokens_BT, lengths_B, state, method, cfg)
    return sample(logits_BV, rng, gen.sampling), state


@functools.partial(jax.jit, static_argnames=("method", "cfg", "gen"), donate_argnames=("state",))
def decode_loop(params: Params, first_B, lengths_B, state, rng, method: CacheMethod, cfg: ModelConfig,
                gen: GenerateConfig):
    """Feeds back tokens until every sequence stopped or N tokens were produced; returns (out_BN, done_B, state)."""
    B, N = first_B.shape[0], gen.max_new_tokens
    stop_ids = jnp.asarray(gen.stop_ids if gen.stop_ids else (-1,), jnp.int32)
    out_BN = jnp.full((B, N), gen.pad_id, jnp.int32).at[:, 0].set(first_B)
    done_B = jnp.isin(first_B, stop_ids)

    def cond(carry):
        step, _, done_B, _, _ = carry
        return (step < N) & ~jnp.all(done_B)

    def body(carry):
        step, out_BN, done_B, state, rng = carry
        rng, key = jax.random.split(rng)
        prev_B = out_BN[:, step - 1]
        logits_BV, state = llama.decode_step(params, prev_B, lengths_B + step - 1, state, method, cfg)
        next_B = jnp.where(done_B, gen.pad_id, sample(logits_BV, key, gen.sampling))
        out_BN = out_BN.at[:, step].set(next_B)
        done_B = done_B | jnp.isin(next_B, stop_ids)
        return step + 1, out_BN, done_B, state, rng

    carry = (jnp.int32(1), out_BN, done_B, state, rng)
    _, out_BN, done_B, state, _ = jax.lax.while_loop(cond, body, carry)
    return out_BN, done_B, state


def generate(params: Params, prompts: Sequence[Sequence[int]], cfg: ModelConfig, method: CacheMethod,
             gen: GenerateConfig, rng: jax.Array) -> Generation:
    """Generates up to gen.max_new_tokens after each prompt (ids), stopping a sequence at any of gen.stop_ids."""
    check_prompts(prompts, gen.max_new_tokens, cfg)
    tokens_BT, lengths_B = pad_prompts(prompts, gen.pad_id)
    state = method.init(cfg, len(prompts), tokens_BT.shape[1] + gen.max_new_tokens)
    rng_first, rng_loop = jax.random.split(rng)
    first_B, state = prefill_and_sample(params, tokens_BT, lengths_B, state, rng_first, method, cfg, gen)
    out_BN, done_B, state = decode_loop(params, first_B, lengths_B, state, rng_loop, method, cfg, gen)
    if hasattr(method, "check"):  # methods that can run out of room say so instead of returning garbage
        method.check(state)
    out_BN, done_B = np.asarray(out_BN), np.asarray(done_B)
    tokens, seen = [], []
    for b in range(len(prompts)):
        row = list(out_BN[b])
        hits = [i for i, t in enumerate(row) if t in gen.stop_ids]
        row = row[:hits[0] + 1] if hits else row
        tokens.append([int(t) for t in row])
        seen.append(lengths_B[b] + len(row) - 1)
    return Generation(tokens=tokens, finished=[bool(d) for d in done_B], state=state,
                      lengths=np.array(seen, np.int32))
