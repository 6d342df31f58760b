"""DMC hyper-parameters (docs/methods/dmc.md); defaults follow the authors' reference implementation."""

from __future__ import annotations

import dataclasses
from typing import Optional

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
