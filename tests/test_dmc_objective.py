"""The DMC retrofit objective: stages, schedule and compression loss at chosen steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.dmc.loss import compression_loss, compression_ratio, target_cr
from dmc_jax.dmc.objective import DMCObjective
from dmc_jax.dmc.surgery import FadedChannelAttention, zero_decision_rows
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params


def test_target_cr_schedule_at_chosen_steps():
    t = lambda s: float(target_cr(jnp.int32(s), 4.0, zero_out_steps=10, retrofit_steps=31))
    assert t(0) == 1.0 and t(9) == 1.0 and t(10) == 1.0
    assert t(25) == pytest.approx(2.5)  # halfway up the ramp: 10 + 15 of 30 intervals
    assert t(40) == 4.0 and t(1000) == 4.0


def test_compression_loss_is_one_sided():
    valid = jnp.ones((2, 4), bool)
    alpha = jnp.zeros((3, 2, 4, 2)).at[:, 0].set(1.0)  # sequence 0 merges everything, sequence 1 nothing
    # target CR 2 wants alpha_bar >= 0.5: sequence 0 is free (more compressed), sequence 1 pays 0.5.
    assert float(compression_loss(alpha, valid, jnp.float32(2.0))) == pytest.approx(0.25)
    assert float(compression_loss(alpha, valid, jnp.float32(1.0))) == 0.0
    assert float(compression_ratio(jnp.float32(0.75))) == pytest.approx(4.0)
    padded = valid.at[1, 2:].set(False)
    alpha = alpha.at[:, 1, 2:].set(1.0)  # merges on padding do not count
    assert float(compression_loss(alpha, padded, jnp.float32(2.0))) == pytest.approx(0.25)


def _model():
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    return cfg, params, tokens


def test_inactive_stage_is_the_vanilla_model_with_a_faded_channel():
    cfg, params, tokens = _model()
    for fade in (1.0, 0.3, 0.0):
        staged = DMCAttention(DMCConfig(mode="train"), active=jnp.bool_(False), fade=jnp.float32(fade))
        got, aux = llama.forward_aux(params, tokens, cfg, attention=staged, rng=jax.random.PRNGKey(0))
        want, _ = llama.forward_aux(params, tokens, cfg,
                                    attention=FadedChannelAttention(DMCConfig(), jnp.float32(fade)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        assert float(aux["alpha_BTK"].max()) == 0.0


def test_active_stage_is_plain_dmc():
    cfg, params, tokens = _model()
    dmc = DMCConfig(mode="hard")
    got, _ = llama.forward_aux(params, tokens, cfg, attention=DMCAttention(dmc, active=jnp.bool_(True),
                                                                           fade=jnp.float32(0.0)))
    want, _ = llama.forward_aux(params, tokens, cfg, attention=DMCAttention(dmc))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)


def test_objective_stages_surgery_and_metrics():
    cfg, params, tokens = _model()
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens), "positions": jnp.broadcast_to(jnp.arange(12),
                                                                                                   tokens.shape)}
    obj = DMCObjective(cfg=cfg, dmc=DMCConfig(), final_cr=4.0, zero_out_steps=5, retrofit_steps=10)
    loss1, m1 = obj.loss(params, batch, jax.random.PRNGKey(0), jnp.int32(2))
    assert int(m1["stage"]) == 1 and float(m1["cr_loss"]) == 0.0 and float(m1["cr"]) == 1.0
    assert obj.on_step(params, 4) is params
    operated = obj.on_step(params, 5)
    assert float(jnp.abs(operated["layers"]["k"][..., -1]).max()) == 0.0
    loss2, m2 = obj.loss(operated, batch, jax.random.PRNGKey(0), jnp.int32(14))
    assert int(m2["stage"]) == 2 and float(m2["cr_target"]) == 4.0
    # right after surgery a_t = -5: nearly every decision appends, so the loss is ~ (1 - 1/4) above the CE.
    assert float(m2["cr_loss"]) > 0.7
    assert m2["cr_layer_head"].shape == (cfg.num_layers, cfg.num_kv_heads)
    g = jax.grad(lambda p: obj.loss(p, batch, jax.random.PRNGKey(0), jnp.int32(14))[0])(operated)
    assert float(jnp.abs(g["layers"]["k"][..., -1]).sum()) > 0
    control = DMCObjective(cfg=cfg, dmc=DMCConfig(), final_cr=4.0, zero_out_steps=5, retrofit_steps=10, control=True)
    _, mc = control.loss(operated, batch, jax.random.PRNGKey(0), jnp.int32(14))
    assert float(mc["cr"]) == 1.0 and int(mc["stage"]) == 1


def test_decision_columns_can_learn_faster():
    cfg, params, _ = _model()
    ones = jax.tree.map(jnp.ones_like, params)
    obj = DMCObjective(cfg=cfg, dmc=DMCConfig(), final_cr=2.0, zero_out_steps=0, retrofit_steps=4,
                       decision_lr_scale=10.0)
    scaled = obj.scale_updates(ones)
    for name in ("q", "k"):
        assert float(scaled["layers"][name][..., -1].min()) == 10.0
        assert float(scaled["layers"][name][..., :-1].max()) == 1.0
    assert float(scaled["layers"]["v"].max()) == 1.0
    reference = DMCObjective(cfg=cfg, dmc=DMCConfig(), final_cr=2.0, zero_out_steps=0, retrofit_steps=4)
    assert reference.scale_updates(ones) is ones
