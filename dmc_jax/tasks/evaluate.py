"""Task `eval`: sliding-window perplexity (and bits per byte) of any text files."""

from __future__ import annotations

import os
import time

import ml_collections

from dmc_jax.evaluation.perplexity import perplexity
from dmc_jax.evaluation.text_files import read_text


def default_text_files() -> list[str]:
    """The held-out text of the default corpus (never trained on)."""
    from dmc_jax.data import default_corpus

    return default_corpus.heldout_files()


def run(config: ml_collections.ConfigDict, model) -> dict:
    e = config.eval
    files = [f.strip() for f in e.text_files.split(",") if f.strip()] or default_text_files()
    results = {}
    for path in files:
        ids = model.tokenizer.encode(read_text(path))
        if e.max_tokens:
            ids = ids[:e.max_tokens]
        start = time.perf_counter()
        res = perplexity(model.params, ids, model.cfg, window=min(e.window, len(ids)),
                         stride=min(e.stride, len(ids)), batch=e.batch, decode=model.tokenizer.decode)
        seconds = time.perf_counter() - start
        row = res.to_dict() | {"seconds": seconds, "tokens_per_second": res.tokens_scored / seconds}
        print(f"{os.path.basename(path)}: perplexity {res.perplexity:.3f}, {res.bits_per_byte:.4f} bits/byte, "
              f"{res.tokens_scored} tokens in {res.windows} windows ({seconds:.1f} s)")
        results[path] = row
    return {"perplexity": results, "window": e.window, "stride": e.stride}
