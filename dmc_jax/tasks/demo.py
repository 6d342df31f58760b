"""Task `demo`: perplexity of the default model on held-out text, then a generation."""

from __future__ import annotations

import ml_collections

from dmc_jax.tasks import evaluate, generate


def run(config: ml_collections.ConfigDict, model) -> dict:
    return {"eval": evaluate.run(config, model), "generate": generate.run(config, model)}
