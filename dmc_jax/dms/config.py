"""DMS hyper-parameters; defaults follow NVIDIA's public reference (Model-Optimizer, experimental/dms).

Eviction decision of KV head k at token t, from one of two sources (`decision`):
  'q_channel' (default; no new parameters; the reference's dms_separate_alpha=False, the released
      nvidia/Qwen3-8B-DMS-8x): a_t = q_t^(g0)[ch] * scale - offset, read from one channel of the FIRST query head
      g0 of the group, which is then zeroed in that head before and after RoPE so it no longer contributes to q.k.
      Keys and the other query heads are untouched.
  'adapter' (the reference's dms_separate_alpha=True, Model-Optimizer's training recipe): a_t = (RMSNorm_a(x_t) @
      W_a)[k] * scale - offset, a per-layer linear map [D, K] from the layer's input x_t (the residual stream,
      before the attention norm) through the adapter's own RMSNorm; q and k are untouched. Its parameters are
      params['layers']['dms_adapter'] [L, D, K] and ['dms_adapter_norm'] [L, D] (a model with cfg.dms_adapter).
The decision made
at token t marks the PREVIOUS token t - 1 (the reference shifts decisions by one); a marked token stays visible for
a sliding window of w more tokens: query t sees key j iff t - j <= w or token j was not marked.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from dmc_jax.errors import UserError

MODES = ("train", "hard", "keep")
SOURCES = ("q_channel", "adapter")


@dataclasses.dataclass(frozen=True)
class DMSConfig:
    """Static DMS settings (hashable: a jit static argument).

    window: w, how many later tokens still see a token marked for eviction (reference 512).
    decision_channel: the query channel read for the decision (reference: the last, -1).
    decision_scale / decision_offset: a = q[ch] * scale - offset (reference 100 and 5: the decision logit moves 100x
        faster than the weights, and starts at -5 once the channel's W_q column is zeroed).
    temperature: tau of the Gumbel-sigmoid relaxation (0.1).
    mode: 'train' (relaxed decisions with logistic noise, the soft mask log(1 - alpha)), 'hard' (0/1 decisions,
        straight-through gradient: exactly what the inference cache keeps), 'keep' (nothing is ever evicted).
    zero_after_rope: also zero channel ch of the decision head after RoPE (the reference does; q_channel only).
    decision: where a comes from: 'q_channel' or 'adapter' (the module docstring).
    """

    window: int = 512
    decision_channel: int = -1
    decision_scale: float = 100.0
    decision_offset: float = 5.0
    temperature: float = 0.1
    mode: str = "train"
    zero_after_rope: bool = True
    decision: str = "q_channel"

    def __post_init__(self):
        if self.decision not in SOURCES:
            raise UserError(f"dms.decision must be one of {', '.join(SOURCES)}; got {self.decision!r}")
        if self.mode not in MODES:
            raise UserError(f"dms.mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        if not isinstance(self.window, int) or self.window < 0:
            raise UserError(f"dms.window must be an int >= 0; got {self.window!r}")
        if self.temperature <= 0:
            raise UserError(f"dms.temperature must be > 0; got {self.temperature}")
        if self.decision_scale <= 0:
            raise UserError(f"dms.decision_scale must be > 0; got {self.decision_scale}")

    @property
    def zeroes_q_after_rope(self) -> bool:
        """Whether attention zeroes the decision channel of q after RoPE too (q_channel decisions only)."""
        return self.zero_after_rope and self.decision == "q_channel"

    def channel(self, head_dim: int) -> int:
        """The decision channel as an index in [0, head_dim)."""
        if not -head_dim <= self.decision_channel < head_dim:
            raise UserError(f"dms.decision_channel must be in [-{head_dim}, {head_dim}); got {self.decision_channel}")
        return self.decision_channel % head_dim

    def check_context(self, context: int, what: str) -> None:
        """UserError when the window is not shorter than the context: nothing would ever be evicted."""
        if self.window >= context:
            raise UserError(f"dms.window={self.window} is not shorter than {what}={context}: no token would ever "
                            f"leave the window; lower dms.window")

    def replace(self, **kw) -> "DMSConfig":
        return dataclasses.replace(self, **kw)


def default_section() -> ml_collections.ConfigDict:
    """The `dms` config section: the reference's defaults (NVIDIA Model-Optimizer experimental/dms)."""
    return ml_collections.ConfigDict(dict(
        target_cr=4.0,          # CR* at the end of the ramp
        ramp_steps=500,         # CR target rises linearly from 1 to target_cr over these steps, then holds
        ramp_from_step=0,       # ... starting at this step from ramp_from_cr (a run continued to a higher CR from
        ramp_from_cr=1.0,       # another run's checkpoint, checkpoint.init_from, ramps from where that one was)
        cr_loss_weight=1.0,
        window=512,             # delayed eviction: a marked token stays visible for this many more tokens
        decision_channel=-1,    # the query channel read for the decision (reference: the last)
        decision_scale=100.0,   # a = q[ch] * scale - offset (reference 100, 5)
        decision_offset=5.0,
        temperature=0.1,        # Gumbel-sigmoid tau
        zero_after_rope=True,
        decision="q_channel",   # or 'adapter': a learned linear map from the layer input (train adds a fresh one)
    ))


def from_section(c: ml_collections.ConfigDict) -> DMSConfig:
    """DMSConfig from a `dms` config section."""
    return DMSConfig(window=int(c.window), decision_channel=c.decision_channel, decision_scale=c.decision_scale,
                     decision_offset=c.decision_offset, temperature=c.temperature,
                     zero_after_rope=c.zero_after_rope, decision=c.get("decision", "q_channel"))


def served(dms: DMSConfig, window) -> DMSConfig:
    """The model's DMS settings with a serving window (cache.dms.window / cache.dms_paged.window; 0 = the trained
    window w): a marked token then stays visible for `window` more tokens instead of w. A longer window keeps more of
    the recent past (more slots, lower CR) with the same learned decisions; the cache is sized from it."""
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise UserError(f"cache.dms.window / cache.dms_paged.window must be an int >= 0 (0 = the trained window); "
                        f"got {window!r}")
    return dms.replace(window=window) if window else dms


def validate_section(c: ml_collections.ConfigDict) -> None:
    if c.target_cr < 1.0:
        raise UserError(f"dms.target_cr must be >= 1; got {c.target_cr}")
    if c.ramp_steps < 0:
        raise UserError(f"dms.ramp_steps must be >= 0; got {c.ramp_steps}")
    if c.get("ramp_from_step", 0) < 0 or not 1.0 <= c.get("ramp_from_cr", 1.0) <= c.target_cr:
        raise UserError(f"dms.ramp_from_step must be >= 0 and 1 <= dms.ramp_from_cr <= dms.target_cr; got "
                        f"{c.get('ramp_from_step')} and {c.get('ramp_from_cr')}")
    if c.cr_loss_weight < 0:
        raise UserError(f"dms.cr_loss_weight must be >= 0; got {c.cr_loss_weight}")
    from_section(c)  # the dataclass checks the rest
