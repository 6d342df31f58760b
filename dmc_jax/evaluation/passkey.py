"""Passkey retrieval: a random number hidden at a given depth of corpus filler, asked for at the end.

The prompt (Mohtashami & Jaggi 2023 format, filler from real text instead of repeated sentences):
    <intro> <filler ... The pass key is 12345. Remember it. 12345 is the pass key. ... filler> <question>
The answer is decoded greedily through the compressed cache; a trial is correct when the generated text starts
with the digits of the key (after whitespace). Each (length, depth) cell runs `trials` keys in one batch.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np

from dmc_jax.evaluation.forced_decode import prompt_then_decode

INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclasses.dataclass
class PasskeyCell:
    length: int
    depth: float
    correct: int
    trials: int
    answers: list

    @property
    def accuracy(self) -> float:
        return self.correct / self.trials


def build_prompt(tokenizer, filler_ids: np.ndarray, length: int, depth: float, key: int, offset: int) -> list:
    """Token ids of about `length` tokens: intro, filler with the needle at `depth` (0 = start, 1 = end), question."""
    head = tokenizer.encode(INTRO)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    tail = tokenizer.encode(QUESTION)
    n_fill = max(length - len(head) - len(needle) - len(tail), 0)
    fill = filler_ids[offset:offset + n_fill].tolist()
    cut = int(round(depth * len(fill)))
    return head + fill[:cut] + needle + fill[cut:] + tail


def is_correct(answer: str, key: int) -> bool:
    """A trial is correct when the generated text starts with the key's digits (after whitespace)."""
    return answer.strip().startswith(str(key))


def draw_keys(filler_len: int, lengths: Sequence[int], depths: Sequence[float], trials: int,
              seed: int = 0) -> dict:
    """{length: [(depth, key, filler offset), ...]}: the prompts run_passkey builds for `seed`, in its order (so a
    row's answers can be checked prompt by prompt afterwards, e.g. benchmarks/passkey_paired.py)."""
    rng = np.random.default_rng(seed)
    drawn = {}
    for length in lengths:
        drawn[length] = []
        for depth in depths:
            for _ in range(trials):
                key = int(rng.integers(10000, 100000))
                offset = int(rng.integers(0, max(filler_len - length, 1)))
                drawn[length].append((float(depth), key, offset))
    return drawn


def row_hits(cells: Sequence[dict], filler_len: int, seed: int) -> list:
    """Per prompt, in draw order, whether a stored passkey row got it right: `cells` as task compare writes them
    ({length, depth, accuracy, answers} per (length, depth), the same trials each), checked against the keys `seed`
    drew. ValueError when the answers do not give the row's own accuracies (a wrong seed or filler)."""
    lengths = list(dict.fromkeys(c["length"] for c in cells))
    depths = list(dict.fromkeys(c["depth"] for c in cells))
    trials = len(cells[0]["answers"])
    drawn = draw_keys(filler_len, lengths, depths, trials, seed)
    hits = []
    for length in lengths:
        answers = [a for c in cells if c["length"] == length for a in c["answers"]]
        got = [is_correct(a, key) for a, (_, key, _) in zip(answers, drawn[length])]
        if len(answers) != len(drawn[length]) or \
                sum(got) != round(sum(c["accuracy"] * len(c["answers"]) for c in cells if c["length"] == length)):
            raise ValueError(f"the answers at length {length} do not match seed {seed}'s prompts")
        hits += got
    return hits


def sign_test(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """Prompts only a / only b got right, and the exact two-sided binomial p-value of that split."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n) if n else 1.0
    return {"only_this": only_a, "only_baseline": only_b, "p_two_sided": p}


def run_passkey(params, cfg, tokenizer, filler_ids: np.ndarray, make_method: Callable[[int], object],
                lengths: Sequence[int], depths: Sequence[float], trials: int, seed: int = 0,
                answer_tokens: int = 6, batch: int = 0) -> list[PasskeyCell]:
    """Accuracy per (length, depth); make_method(length) builds the cache method for that context length.
    batch: prompts decoded at once (0 = all of a length; long prompts need chunks: a 2k-token prefill of 24 prompts
    holds GBs of attention scores). Every chunk has the same shape (the last one padded), so one compilation; the
    chunks are balanced (at most `batch` prompts each, as few chunks as that allows)."""
    drawn = draw_keys(len(filler_ids), lengths, depths, trials, seed)
    cells = []
    for length in lengths:
        method = make_method(length)
        rows, keys, meta = [], [], []
        for depth, key, offset in drawn[length]:
            rows.append(build_prompt(tokenizer, filler_ids, length, depth, key, offset))
            keys.append(key)
            meta.append(depth)
        T = max(len(r) for r in rows)
        prompt_BT = np.zeros((len(rows), T), np.int32)
        for b, r in enumerate(rows):
            prompt_BT[b, :len(r)] = r
        lengths_B = np.array([len(r) for r in rows], np.int32)
        n = len(rows)
        chunks = -(-n // min(batch or n, n))
        size = -(-n // chunks)  # balanced chunks: 12 prompts at batch 8 run as 2 x 6, not 8 + 8 with 4 padding
        pad = -n % size  # repeat the last prompt to fill the last chunk; its answers are dropped
        prompt_BT = np.concatenate([prompt_BT, np.repeat(prompt_BT[-1:], pad, 0)])
        lengths_B = np.concatenate([lengths_B, np.repeat(lengths_B[-1:], pad)])
        zeros_BN = np.zeros((size, answer_tokens), np.int32)
        answer_ids = []
        for start in range(0, n + pad, size):
            _, tokens_BN = prompt_then_decode(params, prompt_BT[start:start + size], lengths_B[start:start + size],
                                              zeros_BN, zeros_BN.astype(bool), method, cfg)
            answer_ids += np.asarray(tokens_BN).tolist()
        answers = [tokenizer.decode([int(x) for x in row]) for row in answer_ids[:n]]
        for depth in depths:
            idx = [i for i, d in enumerate(meta) if d == depth]
            hits = sum(is_correct(answers[i], keys[i]) for i in idx)
            cells.append(PasskeyCell(length, float(depth), hits, len(idx), [answers[i] for i in idx]))
    return cells
