"""Task prepare_data: make config.data.source ready for training (fetch, write the TFDS dataset, summarize)."""

from __future__ import annotations

from dmc_jax.data.prepare import prepare
from dmc_jax.data.summary import format_summary


def run(config) -> dict:
    """Prepares config.data with the tokenizer of config.model.source; prints and returns the summary."""
    from dmc_jax.weights import load_tokenizer  # lazily: the weights package pulls in model loaders

    tokenizer = load_tokenizer(config.model.source)
    summary = prepare(config.data, tokenizer)
    print(format_summary(summary), flush=True)
    return summary
