"""DMC hyper-parameters (docs/methods/dmc.md) and the `dmc` config section; defaults follow the authors' reference
implementation."""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

from dmc_jax.errors import UserError

MODES = ("train", "hard", "append")


@dataclasses.dataclass(frozen=True)
class DMCConfig:
    """Static DMC settings (hashable: a jit static argument).

    decision_channel: the key/query channel read for the decision and the importance; the reference uses the
        last one (-1), the paper's text says the first (0).
    decision_offset: c in a_t = k_t[ch] - c and omega_t = sigmoid(mean_g q_t[ch] + c) + eps.
    temperature: tau of the Gumbel-sigmoid relaxation.
    importance_eps: eps added to omega so weights never vanish.
    window: accumulation window w (a slot averages at most the last w tokens of its run); None = unbounded.
    mode: 'train' (relaxed decisions with logistic noise), 'hard' (0/1 decisions, straight-through gradient),
        'append' (every alpha forced to 0: DMC reduces to the vanilla model).
    zero_after_rope: also zero channel ch of q and k after RoPE (the reference convention, docs/methods/dmc.md). Zeroing
        before RoPE already removes the channel from q.k; zeroing after it as well also drops the RoPE partner
        channel's sine term, so with True an all-append DMC model differs slightly from the vanilla model with the
        same weights; with False it equals it bitwise.
    kernels: training-form attention by 'xla' (masked, builds T x T), 'pallas' (flash kernel) or 'auto' (Pallas
        on GPU, XLA elsewhere); see dmc_jax/kernels.py.
    """

    decision_channel: int = -1
    decision_offset: float = 5.0
    temperature: float = 0.1
    importance_eps: float = 2.0 ** -7
    window: Optional[int] = 12
    mode: str = "train"
    zero_after_rope: bool = True
    kernels: str = "auto"

    def __post_init__(self):
        if self.mode not in MODES:
            raise UserError(f"dmc.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if self.temperature <= 0:
            raise UserError(f"dmc.temperature must be > 0; got {self.temperature}")
        if self.importance_eps < 0:
            raise UserError(f"dmc.importance_eps must be >= 0; got {self.importance_eps}")
        if self.kernels not in ("auto", "pallas", "xla"):
            raise UserError(f"dmc.kernels must be one of auto, pallas, xla; got {self.kernels!r}")
        if self.window is not None and self.window < 1:
            raise UserError(f"dmc.window must be >= 1 (or 0 for unbounded); got {self.window}")

    def channel(self, head_dim: int) -> int:
        """The decision channel as an index in [0, head_dim)."""
        ch = self.decision_channel % head_dim
        if not -head_dim <= self.decision_channel < head_dim:
            raise UserError(f"dmc.decision_channel must be in [-{head_dim}, {head_dim}); got {self.decision_channel}")
        return ch

    def replace(self, **kw) -> "DMCConfig":
        return dataclasses.replace(self, **kw)


def from_section(c: ml_collections.ConfigDict) -> DMCConfig:
    """DMCConfig from the `dmc` config section (window 0 = unbounded)."""
    return DMCConfig(decision_channel=c.decision_channel, decision_offset=c.decision_offset,
                     temperature=c.temperature, importance_eps=c.importance_eps, window=c.window or None,
                     zero_after_rope=c.zero_after_rope, kernels=c.get("kernels", "auto"))


def default_section() -> ml_collections.ConfigDict:
    """The `dmc` config section, reference defaults (docs/methods/dmc.md)."""
    return ml_collections.ConfigDict(dict(
        target_cr=2.0,            # CR* reached at the end of the retrofit stage
        zero_out_steps=250,       # stage 1
        retrofit_steps=6000,      # stage 2 (CR target ramp); stage 3 = the remaining train.steps
        cr_loss_weight=1.0,
        control=False,            # True: same recipe, every decision 'append' (the vanilla control)
        decision_lr_scale=1.0,    # learning-rate factor of the decision/importance columns (1 = reference)
        decision_channel=-1,      # -1 = last (reference); the paper's text says the first (0)
        decision_offset=5.0,
        temperature=0.1,
        importance_eps=2.0 ** -7,
        window=12,                # accumulation window; 0 = unbounded
        zero_after_rope=True,     # reference convention (see dmc_jax/dmc/config.py)
        kernels="auto",           # training attention: 'auto' (Pallas flash kernel on GPU, XLA elsewhere) | 'xla' | 'pallas'
    ))


def validate_section(c: ml_collections.ConfigDict) -> None:
    if c.target_cr < 1.0:
        raise UserError(f"dmc.target_cr must be >= 1; got {c.target_cr}")
    for name in ("zero_out_steps", "retrofit_steps"):
        if c[name] < 0:
            raise UserError(f"dmc.{name} must be >= 0; got {c[name]}")
    if c.cr_loss_weight < 0:
        raise UserError(f"dmc.cr_loss_weight must be >= 0; got {c.cr_loss_weight}")
    if not c.decision_lr_scale > 0:
        raise UserError(f"dmc.decision_lr_scale must be > 0; got {c.decision_lr_scale}")
    from_section(c)  # the dataclass checks the rest
