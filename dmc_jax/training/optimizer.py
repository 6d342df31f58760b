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
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ("constant", "cosine", "linear")
EMBEDDINGS = ("embed", "lm_head")  # top-level parameter groups counted as embeddings


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


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip by global norm (optim.clip_norm, 0 = off) then AdamW, the LR schedule)."""
    schedule = make_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=decay_mask(optim.decay_embeddings))
    if optim.clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw), schedule
    return adamw, schedule
