"""The DMC retrofit objective for the training loop: one compiled step for all three stages of the recipe.

  step < zero_out_steps                 stage 1: vanilla model, decision channel faded 1 -> 0, no DMC
  (then the loop applies `on_step`: W_q/W_k columns of the channel set to 0)
  < zero_out + retrofit                 stage 2: DMC, CR target rising linearly 1 -> CR*
  afterwards                            stage 3: DMC at CR*
loss = token cross-entropy + cr_loss_weight * l_CR. With `control=True` the same recipe runs with every decision
forced to 'append' (CR 1): the vanilla control that sees the same tokens.
Evaluation (rng None) uses hard decisions, so validation CR is what inference would keep.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.dmc.config import DMCConfig, default_section, from_section, validate_section
from dmc_jax.dmc.loss import compression_loss, compression_ratio, decision_stats, target_cr
from dmc_jax.dmc.surgery import fade_factor, zero_decision_rows
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.training.losses import student_loss


@dataclasses.dataclass(frozen=True)
class DMCObjective:
    cfg: ModelConfig
    dmc: DMCConfig
    final_cr: float
    zero_out_steps: int
    retrofit_steps: int
    cr_loss_weight: float = 1.0
    control: bool = False
    decision_lr_scale: float = 1.0

    has_decision_params = True  # the W_q/W_k columns of the decision channel (training/distill.py)

    def student(self, params, batch, rng: Optional[jax.Array], step):
        """(logits_BTV, weighted compression loss, metrics) of the DMC model on batch."""
        step = jnp.asarray(step, jnp.int32)
        active = step >= self.zero_out_steps
        if self.control:
            active = jnp.zeros((), bool)
        mode = "train" if rng is not None else "hard"
        attention = DMCAttention(self.dmc.replace(mode=mode), active=active,
                                 fade=fade_factor(step, self.zero_out_steps))
        logits_BTV, aux = llama.forward_aux(params, batch["tokens"], self.cfg, batch["positions"],
                                            batch["segment_ids"], attention=attention, rng=rng)
        valid_BT = batch["segment_ids"] > 0
        target = target_cr(step, self.final_cr, self.zero_out_steps, self.retrofit_steps)
        l_cr = compression_loss(aux["alpha_st_BTK"], valid_BT, target) if not self.control else jnp.float32(0.0)
        stats = decision_stats(jax.lax.stop_gradient(aux["alpha_st_BTK"]), valid_BT)
        metrics = {
            "cr_loss": l_cr, "cr_target": target, "cr": compression_ratio(stats["alpha_mean"]),
            "cr_layer": compression_ratio(stats["alpha_layer"]),
            "cr_layer_head": compression_ratio(stats["alpha_layer_head"]),
            "stage": jnp.where(active, jnp.where(step >= self.zero_out_steps + self.retrofit_steps, 3, 2), 1),
        }
        return logits_BTV, self.cr_loss_weight * l_cr, metrics

    def loss(self, params, batch, rng: Optional[jax.Array], step):
        return student_loss(self.student(params, batch, rng, step), batch)

    def decision_mask(self, params):
        """Pytree like params of (broadcastable) 0/1 masks: 1 on the W_q / W_k columns of the decision channel."""
        col = jnp.zeros((1, 1, 1, self.cfg.head_dim), jnp.float32).at[..., self.dmc.channel(self.cfg.head_dim)].set(1)
        mask = jax.tree.map(lambda _: 0.0, params)
        mask["layers"] = {**mask["layers"], "q": col, "k": col}
        return mask

    def scale_updates(self, updates):
        """Multiplies the updates of the W_q / W_k columns that produce the decision channel by decision_lr_scale.

        With AdamW every weight moves by about the learning rate per step, so the decision logit a_t moves by a
        fixed amount per step; a short retrofit (a CPU demonstration) needs those columns to move faster than the
        rest of the model. 1 (the reference) leaves the updates untouched.
        """
        if self.decision_lr_scale == 1.0:
            return updates
        layers = dict(updates["layers"])
        ch = self.dmc.channel(layers["q"].shape[-1])
        for name in ("q", "k"):
            layers[name] = layers[name].at[..., ch].multiply(self.decision_lr_scale)
        return {**updates, "layers": layers}

    def on_step(self, params, step: int):
        """Host-side hook before `step`: the weight surgery at the first DMC step (idempotent on resume)."""
        if step == self.zero_out_steps:
            return zero_decision_rows(params, self.dmc)
        return params


# The `dmc` section's schema lives with DMCConfig (the inference caches read it too); these names stay for callers.
dmc_config, default_config, validate = from_section, default_section, validate_section


def make(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> DMCObjective:
    """Factory registered as train.objective = 'dmc'."""
    if "dmc" not in config:
        raise UserError("train.objective='dmc' needs a 'dmc' config section; start from configs/smollm2_dmc.py")
    c = config.dmc
    validate(c)
    return DMCObjective(cfg=model_cfg, dmc=dmc_config(c), final_cr=float(c.target_cr),
                        zero_out_steps=int(c.zero_out_steps), retrofit_steps=int(c.retrofit_steps),
                        cr_loss_weight=float(c.cr_loss_weight), control=bool(c.control),
                        decision_lr_scale=float(c.decision_lr_scale))


def eval_attention(section: ml_collections.ConfigDict, control: bool = False):
    """The attention a DMC model is evaluated with after training: hard decisions (exactly what the cache keeps),
    or, for the control, vanilla attention with the decision channel faded to 0 as it was trained."""
    from dmc_jax.dmc.surgery import FadedChannelAttention

    if control:
        return FadedChannelAttention(from_section(section), 0.0)
    return DMCAttention(from_section(section).replace(mode="hard"))
