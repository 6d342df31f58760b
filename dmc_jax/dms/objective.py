"""The DMS retrofit objective: DMS's training form, the one-sided compression loss and a linear CR ramp.

loss = token cross-entropy + cr_loss_weight * l_CR (or, wrapped by training/distill.py, a KL to the frozen original
model + the same l_CR). l_CR = mean over sequences of max(0, (1 - 1/CR_target) - mean decision) (DMC's loss, which
the reference also uses for DMS); CR_target rises linearly from 1 at step 0 to dms.target_cr at step
dms.ramp_steps, then holds. At step 0 the W_q column that produces the decision channel of each group's first
query head is zeroed (that channel is zeroed in attention anyway), so training starts at a = -offset: nothing
evicted. Evaluation (rng None) uses hard decisions: validation CR is what the cache would evict.

Shape letters: L layers, B batch, T time, K KV heads, H query heads, Dh head dim, D model width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections

from dmc_jax.dmc.loss import compression_loss, compression_ratio, decision_stats, target_cr
from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import DMSConfig
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import ModelConfig
from dmc_jax.training.objective import CE, token_cross_entropy


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
    has_decision_params = True  # the W_q columns of the decision channel (training/distill.py's parameter groups)

    def student(self, params, batch, rng: Optional[jax.Array], step):
        """(logits_BTV, weighted compression loss, metrics) of the DMS model on batch."""
        step = jnp.asarray(step, jnp.int32)
        attention = DMSAttention(self.dms.replace(mode="train" if rng is not None else "hard"))
        logits_BTV, aux = llama.forward_aux(params, batch["tokens"], self.cfg, batch["positions"],
                                            batch["segment_ids"], attention=attention, rng=rng)
        valid_BT = batch["segment_ids"] > 0
        target = target_cr(step, self.final_cr, 0, self.ramp_steps + 1)
        l_cr = compression_loss(aux["alpha_st_BTK"], valid_BT, target)
        stats = decision_stats(jax.lax.stop_gradient(aux["alpha_st_BTK"]), valid_BT)
        metrics = {"cr_loss": l_cr, "cr_target": target, "cr": compression_ratio(stats["alpha_mean"]),
                   "cr_layer": compression_ratio(stats["alpha_layer"]),
                   "cr_layer_head": compression_ratio(stats["alpha_layer_head"])}
        return logits_BTV, self.cr_loss_weight * l_cr, metrics

    def loss(self, params, batch, rng: Optional[jax.Array], step):
        logits_BTV, penalty, metrics = self.student(params, batch, rng, step)
        ce, ce_metrics = token_cross_entropy(logits_BTV, batch)
        return ce + penalty, {**ce_metrics, **metrics, CE: ce}

    def decision_mask(self, params):
        """Pytree like params of (broadcastable) 0/1 masks: 1 on the decision parameters."""
        mask = jax.tree.map(lambda _: 0.0, params)
        mask["layers"] = {**mask["layers"], "q": decision_column_mask(self.cfg, self.dms)}
        return mask

    def on_step(self, params, step: int):
        """Host-side hook: at step 0, zero the W_q columns of the decision channel (decisions start at -offset)."""
        if step != 0:
            return params
        layers = dict(params["layers"])
        keep = 1.0 - decision_column_mask(self.cfg, self.dms)
        layers["q"] = jnp.asarray(layers["q"]) * keep.astype(jnp.asarray(layers["q"]).dtype)
        return {**params, "layers": layers}


def default_config() -> ml_collections.ConfigDict:
    """The `dms` config section: the reference's defaults (NVIDIA Model-Optimizer experimental/dms)."""
    return ml_collections.ConfigDict(dict(
        target_cr=4.0,          # CR* at the end of the ramp
        ramp_steps=500,         # CR target rises linearly from 1 to target_cr over these steps, then holds
        cr_loss_weight=1.0,
        window=512,             # delayed eviction: a marked token stays visible for this many more tokens
        decision_channel=-1,    # the query channel read for the decision (reference: the last)
        decision_scale=100.0,   # a = q[ch] * scale - offset (reference 100, 5)
        decision_offset=5.0,
        temperature=0.1,        # Gumbel-sigmoid tau
        zero_after_rope=True,
    ))


def dms_config(c: ml_collections.ConfigDict) -> DMSConfig:
    """DMSConfig from a `dms` config section."""
    return DMSConfig(window=int(c.window), decision_channel=c.decision_channel, decision_scale=c.decision_scale,
                     decision_offset=c.decision_offset, temperature=c.temperature,
                     zero_after_rope=c.zero_after_rope)


def validate(c: ml_collections.ConfigDict, seq_len: Optional[int] = None) -> None:
    if c.target_cr < 1.0:
        raise UserError(f"dms.target_cr must be >= 1; got {c.target_cr}")
    if c.ramp_steps < 0:
        raise UserError(f"dms.ramp_steps must be >= 0; got {c.ramp_steps}")
    if c.cr_loss_weight < 0:
        raise UserError(f"dms.cr_loss_weight must be >= 0; got {c.cr_loss_weight}")
    dms = dms_config(c)  # the dataclass checks the rest
    if seq_len is not None:
        dms.check_context(seq_len, "data.seq_len")


def make(config: ml_collections.ConfigDict, model_cfg: ModelConfig) -> DMSObjective:
    """Factory registered as train.objective = 'dms'."""
    if "dms" not in config:
        raise UserError("train.objective='dms' needs a 'dms' config section; start from configs/smollm2_dms.py")
    c = config.dms
    validate(c, config.data.seq_len if "data" in config else None)
    return DMSObjective(cfg=model_cfg, dms=dms_config(c), final_cr=float(c.target_cr),
                        ramp_steps=int(c.ramp_steps), cr_loss_weight=float(c.cr_loss_weight))
