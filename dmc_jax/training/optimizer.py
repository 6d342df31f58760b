"""The optimizer of the `optim` config section: AdamW with a decay mask, an LR schedule and global-norm clipping.

Schedule (optim.schedule), in optimizer updates counted from 0:
    linear warmup lr / warmup_steps -> lr over updates 0 .. warmup_steps - 1, then
    'constant'  lr to the end
    'cosine'    lr for hold_steps, then cosine lr -> end_lr over decay_steps (0 = the rest of train.steps)
    'linear'    lr for hold_steps, then linear lr -> end_lr over decay_steps (0 = the rest of train.steps)
DMC's recipe (constant, then cosine) is 'cosine' with hold_steps = the constant stage.

Weight decay is decoupled (AdamW: p -= lr * weight_decay * p) and skips norm scales; embeddings (the input table
and the untied lm_head) are decayed unless optim.decay_embeddings is False (Megatron, the DMC reference, decays them).
Parameters stay in their own dtype (fp32 master weights); the model casts to cfg.compute_dtype inside.

optim.freeze names groups of the model's own weights that stay fixed: 'embed' (the input table and an untied
lm_head), 'mlp' (gate, up, down of every layer), 'norms' (every RMSNorm scale but a DMS adapter's, which is a
decision parameter). A frozen weight gets no gradient (the train step stops it, so XLA never computes its
weight-gradient matmuls), no optimizer state (optax's set_to_zero branch of multi_transform) and no share of the
clipping norm. Attention weights cannot be frozen this way: the learned methods' decision parameters live in
W_q / W_k (distill.base_lr_scale=0 freezes everything but those).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")
EMBEDDINGS = ("embed", "lm_head")  # top-level parameter groups counted as embeddings
MLP = ("gate", "up", "down")
FREEZE_GROUPS = ("embed", "mlp", "norms")


def make_schedule(optim, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the 0-based update count."""
    warmup, hold = optim.warmup_steps, optim.hold_steps
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.lr)
    else:
        decay = optim.decay_steps or max(total_steps - warmup - hold, 1)
        if optim.schedule == "cosine":
            tail = optax.cosine_decay_schedule(optim.lr, decay, alpha=optim.end_lr / optim.lr if optim.lr else 0.0)
        else:
            tail = optax.linear_schedule(optim.lr, optim.end_lr, decay)
        after = optax.join_schedules([optax.constant_schedule(optim.lr), tail], [hold]) if hold else tail
    if not warmup:
        return after
    ramp = lambda count: optim.lr * (jnp.minimum(count, warmup - 1) + 1) / warmup  # lr / warmup at update 0
    return optax.join_schedules([ramp, after], [warmup])


def decay_mask(decay_embeddings: bool) -> Callable:
    """params -> pytree of bools: True where weight decay applies (never norm scales)."""

    def decides(path, _):
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        if str(names[-1]).endswith("norm"):
            return False
        return decay_embeddings or names[0] not in EMBEDDINGS

    return lambda params: jax.tree_util.tree_map_with_path(decides, params)


def freeze_mask(groups) -> Callable:
    """params -> pytree of bools: True where a weight belongs to one of the frozen groups (see the docstring)."""
    groups = tuple(groups)

    def frozen(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        return (("embed" in groups and names[0] in EMBEDDINGS)
                or ("mlp" in groups and names[-1] in MLP)
                or ("norms" in groups and names[-1].endswith("norm") and not names[-1].startswith("dms_")))

    return lambda params: jax.tree_util.tree_map_with_path(frozen, params)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip by global norm (optim.clip_norm, 0 = off) then AdamW, the LR schedule); frozen groups
    (optim.freeze) get neither."""
    schedule = make_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask(optim.decay_embeddings))
    tx = optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm > 0 else adamw
    groups = tuple(optim.get("freeze", ()))
    if groups:
        mask = freeze_mask(groups)
        labels = lambda params: jax.tree.map(lambda f: "frozen" if f else "train", mask(params))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx, schedule
