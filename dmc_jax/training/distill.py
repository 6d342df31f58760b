"""Distillation and parameter groups for every trainable method (DMC, DMS, up-trained GQA: any objective with a
`student` method), wrapped around the method's objective by training/objective.make_objective.

`distill` section:
    loss        'lm'          next-token cross-entropy (the method's own objective, unchanged)
                'kl'          forward KL(teacher || student) of the next-token distributions
                'reverse_kl'  KL(student || teacher), the direction NVIDIA's DMS reference code computes
    lm_weight   adds lm_weight * cross-entropy to a KL loss (0 = pure distillation)
    teacher     '' = the student's own initial weights (the frozen original model); or another model source with
                the same vocabulary (e.g. a larger model of the family)
    base_lr_scale      learning-rate factor of every parameter that is not a decision parameter (0 = frozen base:
                       only the method's decision parameters train)
    decision_lr_scale  learning-rate factor of the method's decision parameters (DMC/DMS: W_q/W_k columns)
Whole groups of weights (the embedding, the MLPs, the norms) are kept fixed by optim.freeze instead: no gradient
and no optimizer state, so a step is cheaper, not just slower to move (training/optimizer.py).
The method's compression loss is added in every case. The teacher runs in the same step on the same batch: it is a
non-trained input of the jitted step (`frozen_inputs`, handed back through `bind`), stored in the compute dtype
(the forward casts weights to it anyway), never differentiated, and never checkpointed (it is rebuilt from the
initial weights on resume). KL is averaged over the positions that have a next-token target (as the CE).

Shape letters: B batch, T time, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dmc_jax.data.packing import target_weights
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.training.losses import CE, WEIGHT, token_cross_entropy

LOSSES = ("lm", "kl", "reverse_kl")


def default_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(dict(loss="lm", lm_weight=0.0, teacher="", base_lr_scale=1.0,
                                          decision_lr_scale=1.0))


def apply_recipe(config: ml_collections.ConfigDict, base_lr_scale: float = 0.1) -> None:
    """The CPU distillation recipe every learned method here shares (configs/smollm2_main.py for DMS,
    smollm2_dmc_distill.py, smollm2_gqa_distill.py), set on a run config: forward KL to the frozen teacher, no LM
    term; the base at lr x base_lr_scale and the decision parameters at lr; a constant 1e-4 after 5 warm-up steps,
    no weight decay; half of the rows carry two facts restated later (data/recall.py)."""
    config.distill = default_config()
    config.distill.update(loss="kl", base_lr_scale=base_lr_scale, decision_lr_scale=1.0)
    config.data.update(recall_fraction=0.5, recall_facts=2)
    config.optim.update(lr=1e-4, schedule="constant", warmup_steps=5, weight_decay=0.0)


def validate(c: ml_collections.ConfigDict) -> None:
    if c.loss not in LOSSES:
        raise UserError(f"distill.loss must be one of {', '.join(LOSSES)}; got {c.loss!r}")
    for name in ("lm_weight", "base_lr_scale", "decision_lr_scale"):
        if not c[name] >= 0:
            raise UserError(f"distill.{name} must be >= 0; got {c[name]!r}")
    if not isinstance(c.teacher, str):
        raise UserError(f"distill.teacher must be a model source ('' = the initial weights); got {c.teacher!r}")


def token_kl(teacher_BTV: jax.Array, student_BTV: jax.Array, weights_BT: jax.Array, reverse: bool) -> jax.Array:
    """Mean over weighted positions of KL(teacher || student) (reverse: KL(student || teacher)), fp32."""
    if not reverse:
        kl_BT = forward_kl_rows(teacher_BTV, student_BTV)
    else:
        t_BTV = jax.nn.log_softmax(teacher_BTV.astype(jnp.float32), axis=-1)
        s_BTV = jax.nn.log_softmax(student_BTV.astype(jnp.float32), axis=-1)
        kl_BT = jnp.sum(jnp.exp(s_BTV) * (s_BTV - t_BTV), axis=-1)
    return (kl_BT * weights_BT).sum() / jnp.maximum(weights_BT.sum(), 1.0)


def _logsumexp(x_BTV: jax.Array) -> jax.Array:
    """[B, T, 1] log-sum-exp over the vocabulary (fp32)."""
    m_BT1 = jnp.max(x_BTV, axis=-1, keepdims=True)
    return m_BT1 + jnp.log(jnp.sum(jnp.exp(x_BTV - m_BT1), axis=-1, keepdims=True))


@jax.custom_vjp
def forward_kl_rows(teacher_BTV: jax.Array, student_BTV: jax.Array) -> jax.Array:
    """[B, T] KL(softmax(teacher) || softmax(student)) per position, fp32; differentiable in the student only.

    KL = sum_v p_v (t_v - s_v) - lse(t) + lse(s), and its gradient in s is softmax(s) - p: one pass over the
    vocabulary in the backward (autodiff of two log-softmaxes materializes both [B, T, V] log-probabilities and
    walks them several times: 0.8 s -> 0.5 s per 4 x 256 x 49,152 step on 2 cores)."""
    return _forward_kl_fwd(teacher_BTV, student_BTV)[0]


def _forward_kl_fwd(teacher_BTV, student_BTV):
    t_BTV, s_BTV = teacher_BTV.astype(jnp.float32), student_BTV.astype(jnp.float32)
    lse_t_BT1, lse_s_BT1 = _logsumexp(t_BTV), _logsumexp(s_BTV)
    kl_BT = jnp.sum(jnp.exp(t_BTV - lse_t_BT1) * (t_BTV - s_BTV), axis=-1) - lse_t_BT1[..., 0] + lse_s_BT1[..., 0]
    return kl_BT, (t_BTV, s_BTV, lse_t_BT1, lse_s_BT1, jnp.zeros((0,), student_BTV.dtype))


def _forward_kl_bwd(res, g_BT):
    t_BTV, s_BTV, lse_t_BT1, lse_s_BT1, like_0 = res
    g_BTV = (jnp.exp(s_BTV - lse_s_BT1) - jnp.exp(t_BTV - lse_t_BT1)) * g_BT[..., None]
    return None, g_BTV.astype(like_0.dtype)


forward_kl_rows.defvjp(_forward_kl_fwd, _forward_kl_bwd)


def _freeze(params, mask, decision_lr_scale: float):
    """params whose gradient is zero outside the mask (and inside it too when decision_lr_scale is 0)."""
    def one(p, m):
        if isinstance(m, float):
            return p if (m and decision_lr_scale) else jax.lax.stop_gradient(p)
        return jnp.where(jnp.broadcast_to(m, p.shape) > 0, p, jax.lax.stop_gradient(p)) if decision_lr_scale \
            else jax.lax.stop_gradient(p)
    return jax.tree.map(one, params, mask)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An Objective: method.student's logits under the distill section's loss, plus the method's compression loss."""

    method: Any
    cfg: ModelConfig
    loss_kind: str = "lm"
    lm_weight: float = 0.0
    base_lr_scale: float = 1.0
    decision_lr_scale: float = 1.0
    teacher_source: str = ""
    teacher_cfg: Optional[ModelConfig] = None
    teacher: Any = dataclasses.field(default=None, compare=False, hash=False)  # bound inside the jitted step

    @property
    def distills(self) -> bool:
        return self.loss_kind != "lm"

    # -------------------------------------------------------------------------------------------- frozen inputs
    def frozen_inputs(self, initial_params):
        """The teacher's weights (host copies in the compute dtype), or None without distillation."""
        if not self.distills:
            return None
        if self.teacher_source:
            from dmc_jax.weights import load_model

            initial_params = load_model(self.teacher_source, require_tokenizer=False).params
        return jax.tree.map(lambda x: np.array(jax.device_get(x), self._frozen_dtype(np.ndim(x))), initial_params)

    def frozen_shapes(self, initial_shapes):
        """ShapeDtypeStructs of frozen_inputs without reading a weight (task plan compiles the step from shapes)."""
        if not self.distills:
            return None
        if self.teacher_source:
            from dmc_jax.model.params import param_shapes, unflatten

            initial_shapes = unflatten({p: jax.ShapeDtypeStruct(shape, self.teacher_cfg.pdtype)
                                        for p, (shape, _) in param_shapes(self.teacher_cfg).items()})
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, self._frozen_dtype(len(x.shape))), initial_shapes)

    def _frozen_dtype(self, ndim: int):
        """The teacher's copy of a weight: matrices in the compute dtype, norm scales (1-D) in fp32."""
        return self.teacher_cfg.dtype if ndim > 1 else np.float32

    def bind(self, frozen) -> "Recipe":
        return dataclasses.replace(self, teacher=frozen)

    # ----------------------------------------------------------------------------------------------------- loss
    def loss(self, params, batch, rng, step):
        if self.base_lr_scale == 0.0:  # frozen base: no gradient (so none in the clipping norm) outside the mask
            params = _freeze(params, self.method.decision_mask(params), self.decision_lr_scale)
        logits_BTV, penalty, metrics = self.method.student(params, batch, rng, step)
        if not self.distills:
            ce, ce_metrics = token_cross_entropy(logits_BTV, batch)
            return ce + penalty, {**ce_metrics, **metrics, CE: ce}
        # Under pure distillation the cross-entropy is only reported: no gradient is computed through it.
        ce, ce_metrics = token_cross_entropy(logits_BTV if self.lm_weight else jax.lax.stop_gradient(logits_BTV),
                                             batch)
        metrics = {**ce_metrics, **metrics, CE: ce}
        if self.teacher is None:
            raise ValueError("a distillation Recipe must be bound to its teacher (Recipe.bind) inside the step")
        teacher_BTV = jax.lax.stop_gradient(llama.forward(self.teacher, batch["tokens"], self.teacher_cfg,
                                                          batch["positions"], batch["segment_ids"]))
        _, weights_BT = target_weights(batch)  # (recall rows' restatements weigh data.recall_weight)
        kl = token_kl(teacher_BTV, logits_BTV, weights_BT, self.loss_kind == "reverse_kl")
        metrics["kl"] = kl
        return kl + (self.lm_weight * ce if self.lm_weight else 0.0) + penalty, metrics

    # ----------------------------------------------------------------------------------------- optional hooks
    def on_step(self, params, step: int):
        hook = getattr(self.method, "on_step", None)
        return params if hook is None else hook(params, step)

    def scale_updates(self, updates):
        """The method's own update scaling, then the parameter groups' learning-rate factors."""
        inner = getattr(self.method, "scale_updates", None)
        if inner is not None:
            updates = inner(updates)
        base, dec = self.base_lr_scale, self.decision_lr_scale
        if base == 1.0 and dec == 1.0:
            return updates
        mask = self.method.decision_mask(updates) if getattr(self.method, "has_decision_params", False) \
            else jax.tree.map(lambda _: 0.0, updates)
        return jax.tree.map(lambda u, m: (u * (base + (dec - base) * jnp.asarray(m, jnp.float32))).astype(u.dtype),
                            updates, mask)


def wrap(method, config: ml_collections.ConfigDict, cfg: ModelConfig):
    """The method's objective wrapped by the config's `distill` section (returned unchanged without one)."""
    if "distill" not in config:
        return method
    c = config.distill
    validate(c)
    trainable = getattr(method, "has_decision_params", False)
    if c.base_lr_scale == 0 and (not trainable or c.decision_lr_scale == 0):
        what = (f"train.objective={config.train.objective!r} has no decision parameters" if not trainable
                else "distill.decision_lr_scale is 0")
        raise UserError(f"nothing to train: distill.base_lr_scale is 0 (frozen base) and {what}; raise "
                        f"distill.base_lr_scale or distill.decision_lr_scale")
    if (c.base_lr_scale != 1 or c.decision_lr_scale != 1) and not hasattr(method, "student"):
        raise UserError(f"train.objective={config.train.objective!r} does not support the distill section")
    if c.loss != "lm" and not hasattr(method, "student"):
        raise UserError(f"train.objective={config.train.objective!r} cannot be distilled (no student forward)")
    teacher_cfg = cfg
    if c.loss != "lm" and c.teacher:
        from dmc_jax.weights import load_model

        loaded = load_model(c.teacher, require_tokenizer=False)
        if loaded.cfg.vocab_size != cfg.vocab_size:
            raise UserError(f"distill.teacher {c.teacher!r} has a vocabulary of {loaded.cfg.vocab_size} tokens, the "
                            f"student {cfg.vocab_size}; distillation needs the same tokenizer")
        teacher_cfg = loaded.cfg.replace(compute_dtype=cfg.compute_dtype, param_dtype=cfg.param_dtype,
                                         max_seq_len=max(loaded.cfg.max_seq_len, cfg.max_seq_len), remat=cfg.remat,
                                         remat_policy=cfg.remat_policy)
    return Recipe(method=method, cfg=cfg, loss_kind=c.loss, lm_weight=float(c.lm_weight),
                  base_lr_scale=float(c.base_lr_scale), decision_lr_scale=float(c.decision_lr_scale),
                  teacher_source=c.teacher if c.loss != "lm" else "", teacher_cfg=teacher_cfg)
