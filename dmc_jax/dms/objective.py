"""The DMS retrofit objective: DMS's training form, the one-sided compression loss and a linear CR ramp.

loss = token cross-entropy + cr_loss_weight * l_CR (or, wrapped by training/distill.py, a KL to the frozen original
model + the same l_CR). l_CR = mean over sequences of max(0, (1 - 1/CR_target) - mean decision) (DMC's loss, which
the reference also uses for DMS); CR_target rises linearly from 1 at step 0 to dms.target_cr at step
dms.ramp_steps, then holds (or from dms.ramp_from_cr at dms.ramp_from_step over the next ramp_steps steps: a run
continued from another run's checkpoint to a higher CR). At step 0 the W_q column that produces the decision channel of each group's first
query head is zeroed (that channel is zeroed in attention anyway), so training starts at a = -offset: nothing
evicted. With dms.decision='adapter' the decision parameters are the adapter's (W_a and its norm; the model must
have them: cfg.dms_adapter) and step 0 zeroes W_a instead (the reference's zero_out_proj_alpha). Evaluation (rng None) uses hard decisions: validation CR is what the cache would evict.

Shape letters: L layers, B batch, T time, K KV heads, H query heads, Dh head dim, D model width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dmc_jax.dmc.loss import compression_loss, compression_ratio, decision_stats
from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import DMSConfig, default_section, from_section, validate_section
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.training.losses import student_loss


def decision_column_mask(cfg: ModelConfig, dms: DMSConfig) -> jax.Array:
    """[1, 1, H, Dh] float: 1 at (first query head of each group, decision channel) of W_q [L, D, H, Dh]."""
    m = jnp.zeros((1, 1, cfg.num_heads, cfg.head_dim), jnp.float32)
    return m.at[..., ::cfg.group_size, dms.channel(cfg.head_dim)].set(1.0)


@dataclasses.dataclass(frozen=True)
class DMSObjective:
    cfg: ModelConfig
    dms: DMSConfig
    final_cr: float
    ramp_steps: int
    cr_loss_weight: float = 1.0
    ramp_from_step: int = 0
    ramp_from_cr: float = 1.0
    has_decision_params = True  # W_q's decision columns or the adapter (training/distill.py's parameter groups)

    def student(self, params, batch, rng: Optional[jax.Array], step):
        """(logits_BTV, weighted compression loss, metrics) of the DMS model on batch."""
        step = jnp.asarray(step, jnp.int32)
        attention = DMSAttention(self.dms.replace(mode="train" if rng is not None else "hard"))
        logits_BTV, aux = llama.forward_aux(params, batch["tokens"], self.cfg, batch["positions"],
                                            batch["segment_ids"], attention=attention, rng=rng)
        valid_BT = batch["segment_ids"] > 0
        progress = jnp.clip((step - self.ramp_from_step).astype(jnp.float32) / max(self.ramp_steps, 1), 0.0, 1.0)
        target = self.ramp_from_cr + (self.final_cr - self.ramp_from_cr) * progress
        l_cr = compression_loss(aux["alpha_st_BTK"], valid_BT, target)
        stats = decision_stats(jax.lax.stop_gradient(aux["alpha_st_BTK"]), valid_BT)
        metrics = {"cr_loss": l_cr, "cr_target": target, "cr": compression_ratio(stats["alpha_mean"]),
                   "cr_layer": compression_ratio(stats["alpha_layer"]),
                   "cr_layer_head": compression_ratio(stats["alpha_layer_head"])}
        return logits_BTV, self.cr_loss_weight * l_cr, metrics

    def loss(self, params, batch, rng: Optional[jax.Array], step):
        return student_loss(self.student(params, batch, rng, step), batch)

    def decision_mask(self, params):
        """Pytree like params of (broadcastable) 0/1 masks: 1 on the decision parameters."""
        mask = jax.tree.map(lambda _: 0.0, params)
        if self.dms.decision == "adapter":
            mask["layers"] = {**mask["layers"], "dms_adapter": 1.0, "dms_adapter_norm": 1.0}
        else:
            mask["layers"] = {**mask["layers"], "q": decision_column_mask(self.cfg, self.dms)}
        return mask

    def on_step(self, params, step: int):
        """Host-side hook: at step 0, zero the W_q columns of the decision channel, or the adapter's W_a
        (decisions start at -offset)."""
        if step != 0:
            return params
        layers = dict(params["layers"])
        if self.dms.decision == "adapter":
            layers["dms_adapter"] = jnp.zeros_like(jnp.asarray(layers["dms_adapter"]))
            return {**params, "layers": layers}
        keep = 1.0 - decision_column_mask(self.cfg, self.dms)
        layers["q"] = jnp.asarray(layers["q"]) * keep.astype(jnp.asarray(layers["q"]).dtype)
        return {**params, "layers": layers}


# The `dms` section's schema lives with DMSConfig (the inference cache reads it too); these names stay for callers.
dms_config, default_config = from_section, default_section


def validate(c: ml_collections.ConfigDict, seq_len: Optional[int] = None) -> None:
    """The section's checks, and (seq_len given) that the window is shorter than the training sequences."""
    validate_section(c)
    if seq_len is not None:
        from_section(c).check_context(seq_len, "data.seq_len")


def eval_attention(section: ml_collections.ConfigDict, control: bool = False):
    """The attention a DMS model is evaluated with after training: hard decisions (what the cache keeps), or,
    for a control, nothing evicted."""
    return DMSAttention(from_section(section).replace(mode="keep" if control else "hard"))


def with_adapter(config: ml_collections.ConfigDict, model_cfg: ModelConfig, params):
    """(model_cfg, params) with a fresh DMS adapter (W_a = 0, norm = 1) when dms.decision='adapter' and the model
    has none (the train task's prepare_model hook); unchanged otherwise."""
    if "dms" not in config or dms_config(config.dms).decision != "adapter" or model_cfg.dms_adapter:
        return model_cfg, params
    L, D, K = model_cfg.num_layers, model_cfg.embed_dim, model_cfg.num_kv_heads
    dtype = jnp.asarray(params["layers"]["q"]).dtype
    layers = {**params["layers"], "dms_adapter": jnp.zeros((L, D, K), dtype),
              "dms_adapter_norm": jnp.ones((L, D), dtype)}
    return model_cfg.replace(dms_adapter=True), {**params, "layers": layers}


def make(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> DMSObjective:
    """Factory registered as train.objective = 'dms'."""
    if "dms" not in config:
        raise UserError("train.objective='dms' needs a 'dms' config section; start from configs/smollm2_dms.py")
    c = config.dms
    validate(c, config.data.seq_len if "data" in config else None)
    if dms_config(c).decision == "adapter" and not model_cfg.dms_adapter:
        raise UserError("dms.decision='adapter' needs a model with DMS adapter parameters (the train task adds "
                        "fresh ones; a DMS adapter checkpoint has them); this model has none")
    return DMSObjective(cfg=model_cfg, dms=dms_config(c), final_cr=float(c.target_cr),
                        ramp_steps=int(c.ramp_steps), cr_loss_weight=float(c.cr_loss_weight),
                        ramp_from_step=int(c.get("ramp_from_step", 0)), ramp_from_cr=float(c.get("ramp_from_cr", 1.0)))
