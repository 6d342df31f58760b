"""The token cross-entropy every objective shares, and the metric names the loop reads.

A batch is the packed output of dmc_jax.data: {'tokens', 'segment_ids', 'positions'}, int32 [B, T]; segment id 0
is padding. Shape letters: B batch, T time, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dmc_jax.data.packing import target_weights

Batch = dict  # {'tokens', 'segment_ids', 'positions'}: int32 [B, T]
Metrics = dict  # name -> jax.Array (a scalar, or e.g. [layers, kv_heads], which the logger writes as a list)

WEIGHT = "weight"  # optional metric: how much this batch counts when batches are averaged (e.g. target tokens)
CE = "ce"  # optional metric: the token cross-entropy, when the loss has other terms (perplexity is exp(ce))


def student_loss(student_out: tuple, batch: Batch) -> tuple[jax.Array, Metrics]:
    """The language-model loss of an objective's student() output (logits_BTV, extra loss, metrics): the token
    cross-entropy plus the extra term (a method's compression loss), with both in the metrics."""
    logits_BTV, penalty, metrics = student_out
    ce, ce_metrics = token_cross_entropy(logits_BTV, batch)
    return ce + penalty, {**ce_metrics, **metrics, CE: ce}


def token_cross_entropy(logits_BTV: jax.Array, batch: Batch) -> tuple[jax.Array, Metrics]:
    """(mean cross-entropy over target tokens, {WEIGHT: target count, 'accuracy'}) in fp32; 0 when no targets.

    Targets are weighed by the batch's 'loss_weights' where it has them (data.recall_weight); WEIGHT is then the sum
    of their weights, so micro-batches combine into the whole batch's weighted mean (training/step.py)."""
    targets_BT, weights_BT = target_weights(batch)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV.astype(jnp.float32), targets_BT)
    count = weights_BT.sum()
    denom = jnp.maximum(count, 1.0)
    # The target's logit is the largest (a max, not an argmax: XLA:CPU's argmax over 49k logits cost 80 ms a step).
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    correct_BT = (target_BT >= jnp.max(logits_BTV, axis=-1)).astype(jnp.float32)
    return (ce_BT * weights_BT).sum() / denom, {WEIGHT: count, "accuracy": (correct_BT * weights_BT).sum() / denom}
