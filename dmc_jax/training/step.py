"""One optimizer update and one evaluation batch, as pure functions of (params, optimizer state, batch, key, step).

Gradient accumulation splits the batch [B, T] into k micro-batches of B/k rows (rows j, j+k, j+2k, ... form
micro-batch j, so each stays spread over the data shards) and runs them in a `lax.scan`, summing in fp32
WEIGHT-weighted gradients: sum_i w_i grad(loss_i) / sum_i w_i. For a loss that is a WEIGHT-weighted mean (the LM
objective: mean cross-entropy over target tokens, WEIGHT = target count) this is the gradient of the big batch.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dmc_jax.training.objective import CE, WEIGHT, Objective

StepFn = Callable  # (params, opt_state, batch, rng, step, frozen) -> (params, opt_state, metrics)


def bound(objective: Objective, frozen) -> Objective:
    """The objective with its non-trained inputs (e.g. a distillation teacher) bound, inside the traced step."""
    return objective if frozen is None else objective.bind(frozen)


def _weight(metrics) -> jax.Array:
    return jnp.asarray(metrics.get(WEIGHT, 1.0), jnp.float32)


def _split(batch: dict, k: int) -> dict:
    """[B, ...] -> [k, B/k, ...], micro-batch j holding rows j, j+k, ..."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def _stopped(freeze_mask: Callable | None, params):
    """params with the gradient of every frozen weight stopped (inside the differentiated function)."""
    if freeze_mask is None:
        return params
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, freeze_mask(params))


def accumulate_gradients(objective: Objective, params, batch: dict, rng, step, k: int,
                         freeze_mask: Callable | None = None):
    """(weighted mean loss, weighted mean metrics with WEIGHT summed, weighted mean gradient) over k micro-batches;
    the gradient of a weight that freeze_mask marks is zero and never computed."""
    grad_fn = jax.value_and_grad(lambda p, *a: objective.loss(_stopped(freeze_mask, p), *a), has_aux=True)
    if k == 1:
        (loss, metrics), grads = grad_fn(params, batch, rng, step)
        return loss, {**metrics, WEIGHT: _weight(metrics)}, grads

    micro = _split(batch, k)

    def body(carry, inputs):
        i, mb = inputs
        (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i) if rng is not None else None, step)
        w = _weight(metrics)
        scaled = jax.tree.map(lambda m: m.astype(jnp.float32) * w, {k_: v for k_, v in metrics.items()
                                                                    if k_ != WEIGHT})
        add = (jax.tree.map(lambda g: g.astype(jnp.float32) * w, grads), w, loss.astype(jnp.float32) * w, scaled)
        return jax.tree.map(jnp.add, carry, add), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(lambda: grad_fn(params, first, rng, step))
    (_, metric_shapes), grad_shapes = shapes
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), tree)
    init = (zeros(grad_shapes), jnp.float32(0), jnp.float32(0),
            zeros({k_: v for k_, v in metric_shapes.items() if k_ != WEIGHT}))
    (grad_sum, w_sum, loss_sum, metric_sums), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
    denom = jnp.where(w_sum > 0, w_sum, 1.0)
    grads = jax.tree.map(lambda g, p: (g / denom).astype(p.dtype), grad_sum, params)
    metrics = {**jax.tree.map(lambda m: m / denom, metric_sums), WEIGHT: w_sum}
    return loss_sum / denom, metrics, grads


def make_train_step(objective: Objective, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1, freeze_mask: Callable | None = None) -> StepFn:
    """(params, opt_state, batch, rng, step, frozen) -> (params, opt_state, metrics): one update; step is 0-based.

    frozen: the objective's non-trained inputs (objective.frozen_inputs, e.g. a teacher's weights) or None.
    freeze_mask: params -> bools, True where a weight of the model stays fixed (optim.freeze): its gradient is
    stopped before the loss, so its weight-gradient computations are never compiled (the optimizer gives it no
    update either).
    metrics: the objective's, plus 'loss', 'grad_norm' (before clipping) and 'lr' (used by this update).
    """

    def train_step(params, opt_state, batch, rng, step, frozen=None):
        objective_ = bound(objective, frozen)
        scale_updates = getattr(objective_, "scale_updates", None)  # optional: per-parameter learning-rate factors
        step_rng = jax.random.fold_in(rng, step)
        loss, metrics, grads = accumulate_gradients(objective_, params, batch, step_rng, step, grad_accum,
                                                    freeze_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        if scale_updates is not None:
            updates = scale_updates(updates)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree_utils.tree_norm(grads),
                                   "lr": jnp.asarray(schedule(step), jnp.float32)}

    return train_step


def make_eval_step(objective: Objective) -> Callable:
    """(params, batch, step, frozen) -> {'loss', CE, WEIGHT} as WEIGHT-weighted sums (rng None: deterministic)."""

    def eval_step(params, batch, step, frozen=None):
        loss, metrics = bound(objective, frozen).loss(params, batch, None, step)
        w = _weight(metrics)
        ce = jnp.asarray(metrics.get(CE, loss), jnp.float32)
        return {"loss": loss.astype(jnp.float32) * w, CE: ce * w, WEIGHT: w}

    return eval_step
