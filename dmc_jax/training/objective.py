"""What the training loop minimizes: the Objective interface, the language-model objective and the objective factory.

The loop knows no method: it differentiates `objective.loss` with respect to params. A trained cache method's
objective (DMC's: training-form attention plus the compression loss) comes from the method registry under its
trained section's name; the config's `distill` section wraps any of them (training/distill.py).

A batch is the packed output of dmc_jax.data: {'tokens', 'segment_ids', 'positions'}, int32 [B, T]; segment id 0
is padding. Shape letters: B batch, T time, V vocab.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

import jax
import jax.numpy as jnp

from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.training.losses import CE, WEIGHT, Batch, Metrics, token_cross_entropy  # noqa: F401 (re-exported)


class Objective(Protocol):
    """A static object (closed over by the jitted step, never traced) with one pure method:

        loss(params, batch, rng, step) -> (scalar loss, metrics)

    params  the model's parameter pytree (stacked layers, fp32 master weights)
    batch   Batch, one micro-batch of this process's rows
    rng     a PRNG key for stochastic objectives (e.g. Gumbel noise), or None for evaluation (deterministic)
    step    int32 scalar: the 0-based index of the optimizer update being computed (for schedules)

    metrics: a dict of arrays. Two names are special: WEIGHT (how much the batch counts: gradient accumulation,
    evaluation and logging average micro-batches weighted by it, so accumulation over micro-batches equals one big
    batch when the loss is a WEIGHT-weighted mean; default 1) and CE (the cross-entropy for perplexity; default
    the loss itself). Every other metric is logged as its WEIGHT-weighted mean over micro-batches.

    Optional: on_step(params, step: int) -> params, called on the host before update `step` (0-based) with the
    current params; return them unchanged (the same object) or edited (e.g. DMC's weight surgery when a stage
    begins). It must depend only on (params, step), so that a resumed run does the same.
    """

    def loss(self, params: Any, batch: Batch, rng: Optional[jax.Array], step: jax.Array) -> tuple[jax.Array,
                                                                                                   Metrics]:
        ...

    # Optional hooks, looked up with getattr by the loop:
    #   on_step(params, step) -> params         host-side, before update `step` (e.g. DMC's weight surgery)
    #   scale_updates(updates) -> updates       inside the jitted step, after the optimizer (per-parameter LR)
    #   frozen_inputs(initial_params) -> pytree  host-side, once: non-trained inputs of every step (a teacher)
    #   bind(frozen) -> Objective                inside the jitted step: the objective that uses them


class LanguageModelObjective:
    """Next-token cross-entropy with plain causal attention; targets only inside the same segment (no padding)."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    has_decision_params = False  # nothing but the base weights (up-trained GQA trains all of them)

    def student(self, params, batch: Batch, rng, step):
        """(logits_BTV, extra loss 0, no metrics): what training/distill.py distills."""
        logits_BTV, _ = llama.forward_aux(params, batch["tokens"], self.cfg, batch["positions"],
                                          batch["segment_ids"], attention=llama.causal_attention)
        return logits_BTV, jnp.float32(0.0), {}

    def loss(self, params, batch: Batch, rng, step):
        return token_cross_entropy(self.student(params, batch, rng, step)[0], batch)


# train.objective -> 'module:attribute' of a factory (config, model_cfg) -> Objective, imported on first use (so this
# module imports no method). The objectives of trained cache methods (e.g. 'dmc') come from the method registry.
OBJECTIVES = {
    "lm": "dmc_jax.training.objective:make_language_model",
}


def objective_names() -> tuple:
    """'lm' and every trained cache method's objective (its trained section's name, e.g. 'dmc')."""
    from dmc_jax.cache import registry

    return tuple(sorted({*OBJECTIVES, *registry.trained_sections()}))


def make_language_model(config, cfg: ModelConfig) -> LanguageModelObjective:
    """Factory of train.objective 'lm'."""
    return LanguageModelObjective(cfg)


def make_objective(name: str, config, cfg: ModelConfig) -> Objective:
    """The objective registered as `name`, built from the run config and the model config."""
    from dmc_jax.cache import registry

    if name not in objective_names():
        raise UserError(f"train.objective must be one of {', '.join(objective_names())}; got {name!r}")
    path = OBJECTIVES[name] if name in OBJECTIVES else registry.trained(name).objective
    factory: Callable = registry.load_factory(path)
    from dmc_jax.training.distill import wrap  # the config's distill section: loss and parameter groups

    return wrap(factory(config, cfg), config, cfg)
