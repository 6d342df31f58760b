"""Distillation from the frozen original model and parameter groups, for every trainable method."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.dms.objective import default_config as dms_default
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.params import init_params
from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer
from dmc_jax.training import distill, loop
from dmc_jax.training.objective import make_objective
from dmc_jax.weights import LoadedModel
from dmc_jax.weights.hf_io import save_hf_dir
from dmc_jax.model.config import tiny_config
from tests.test_training import CFG, corpus, make_config, packed_batch  # noqa: F401 (corpus: a fixture)


def test_token_kl_directions():
    rng = np.random.default_rng(0)
    t, s = (jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32) for _ in range(2))
    w = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.float32)
    pt, ps = jax.nn.softmax(t), jax.nn.softmax(s)
    fwd = (pt * (jnp.log(pt) - jnp.log(ps))).sum(-1)
    rev = (ps * (jnp.log(ps) - jnp.log(pt))).sum(-1)
    np.testing.assert_allclose(distill.token_kl(t, s, w, False), (fwd * w).sum() / 3, rtol=1e-5)
    np.testing.assert_allclose(distill.token_kl(t, s, w, True), (rev * w).sum() / 3, rtol=1e-5)
    assert float(distill.token_kl(t, t, w, False)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_forward_kl_gradient_equals_autodiff_of_the_log_softmax_form(dtype):
    """The custom VJP (softmax(s) - softmax(t)) against autodiff of the definition, at large logits too."""
    rng = np.random.default_rng(1)
    t = jnp.asarray(rng.normal(size=(2, 5, 33)) * 8, dtype)
    s = jnp.asarray(rng.normal(size=(2, 5, 33)) * 8, dtype)
    w = jnp.asarray(rng.integers(0, 2, size=(2, 5)), jnp.float32)

    def reference(s):
        lt = jax.nn.log_softmax(t.astype(jnp.float32))
        ls = jax.nn.log_softmax(s.astype(jnp.float32))
        return ((jnp.exp(lt) * (lt - ls)).sum(-1) * w).sum() / w.sum()

    v, g = jax.value_and_grad(lambda s: distill.token_kl(t, s, w, False))(s)
    v_ref, g_ref = jax.value_and_grad(reference)(s)
    assert g.dtype == dtype
    np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), atol=1e-6 if dtype ==
                               jnp.float32 else 2e-3)


def _config(data, out, objective="dms", **distill_fields):
    c = make_config(data, out, **{"train.objective": objective})
    c.dms = dms_default()
    c.dms.update(window=4, ramp_steps=3, target_cr=3.0, decision_offset=0.5)
    c.distill = distill.default_config()
    c.distill.update(loss="kl", **distill_fields)
    return c


def test_frozen_base_trains_only_the_decision_columns_against_the_original(corpus, tmp_path):
    tmp, data = corpus
    c = _config(data, tmp_path / "run", base_lr_scale=0.0)
    c.train.steps, c.checkpoint.every_steps = 3, 0
    obj = make_objective("dms", c, CFG)
    params0 = init_params(CFG, jax.random.PRNGKey(0))
    teacher = obj.frozen_inputs(params0)
    batch = jax.tree.map(jnp.asarray, packed_batch(rows=2))
    # Student before the surgery == teacher: KL 0 (the compression loss is the only term).
    _, m = obj.bind(teacher).loss(obj.method.on_step(params0, 1), batch, None, 0)
    s = loop.setup(c, CFG, params0, obj, frozen=teacher)
    p, o, rng = s.init_state(jax.tree.map(jnp.copy, params0), 0)
    frozen = s.put_frozen(teacher)
    for step in range(3):
        p = jax.device_put(obj.on_step(p, step), s.param_shardings)
        p, o, metrics = s.train_step(p, o, s.put_batch(packed_batch(rows=4, seed=step)), rng, jnp.int32(step),
                                     *frozen)
    assert float(metrics["kl"]) > 0 and np.isfinite(float(metrics["loss"]))
    mask = np.asarray(obj.method.decision_mask(params0)["layers"]["q"]) > 0
    for name, before in jax.tree_util.tree_leaves_with_path(params0):
        after = dict(jax.tree_util.tree_leaves_with_path(p))[name]
        if jax.tree_util.keystr(name) == "['layers']['q']":
            moved = np.asarray(after) != np.asarray(before)
            assert moved[np.broadcast_to(mask, moved.shape)].any()
            assert not moved[~np.broadcast_to(mask, moved.shape)].any()
        else:
            np.testing.assert_array_equal(after, before, err_msg=jax.tree_util.keystr(name))
    # The teacher is the original model: its logits are the initial params' logits.
    np.testing.assert_allclose(llama.forward(frozen[0], batch["tokens"], CFG),
                               llama.forward(params0, batch["tokens"], CFG), atol=1e-6)


def test_the_kl_weighs_each_target_by_the_batchs_loss_weights(corpus, tmp_path):
    """data.recall_weight's 'loss_weights' reach the distillation loss: a weighted mean of the per-token KL."""
    tmp, data = corpus
    obj = make_objective("dms", _config(data, tmp_path / "run"), CFG)
    params0 = init_params(CFG, jax.random.PRNGKey(0))
    teacher = obj.frozen_inputs(params0)
    student = jax.tree.map(lambda x: x * 1.1, obj.method.on_step(params0, 1))  # not the teacher: KL > 0
    batch = jax.tree.map(jnp.asarray, packed_batch(rows=2))
    kl = lambda b: float(obj.bind(teacher).loss(student, b, None, 0)[1]["kl"])  # noqa: E731
    plain = kl(batch)
    assert plain > 0
    ones = jnp.ones(batch["tokens"].shape, jnp.float32)
    assert kl({**batch, "loss_weights": ones}) == pytest.approx(plain, rel=1e-6)
    assert kl({**batch, "loss_weights": 3 * ones}) == pytest.approx(plain, rel=1e-5)  # a weighted mean
    stressed = kl({**batch, "loss_weights": ones.at[:, 5:9].set(50.0)})
    assert abs(stressed - plain) > 1e-3 * plain


def test_separate_learning_rates_and_lm_option(corpus, tmp_path):
    tmp, data = corpus
    c = _config(data, tmp_path / "run", base_lr_scale=0.5, decision_lr_scale=4.0)
    obj = make_objective("dms", c, CFG)
    ones = jax.tree.map(jnp.ones_like, init_params(CFG, jax.random.PRNGKey(0)))
    scaled = obj.scale_updates(ones)
    q = np.asarray(scaled["layers"]["q"])
    assert set(np.unique(q)) == {0.5, 4.0} and float(scaled["layers"]["v"].max()) == 0.5
    c.distill.loss = "lm"
    lm = make_objective("lm", c, CFG)
    assert lm.frozen_inputs(None) is None  # no teacher without distillation
    loss, m = lm.loss(init_params(CFG, jax.random.PRNGKey(0)), jax.tree.map(jnp.asarray, packed_batch(rows=2)), None,
                      0)
    np.testing.assert_allclose(loss, m["ce"])


def test_nothing_to_train_is_a_user_error(corpus, tmp_path):
    tmp, data = corpus
    with pytest.raises(UserError, match="nothing to train: distill.base_lr_scale is 0 .* has no decision parameters"):
        make_objective("lm", _config(data, tmp_path, objective="lm", base_lr_scale=0.0), CFG)
    with pytest.raises(UserError, match="nothing to train.*decision_lr_scale is 0"):
        make_objective("dms", _config(data, tmp_path, base_lr_scale=0.0, decision_lr_scale=0.0), CFG)


def test_teacher_with_another_vocabulary_is_a_user_error(corpus, tmp_path):
    tmp, data = corpus
    other = tiny_config(vocab_size=CFG.vocab_size + 8)
    save_hf_dir(str(tmp_path / "teacher"), other, init_params(other, jax.random.PRNGKey(1)))
    c = _config(data, tmp_path / "run", teacher=str(tmp_path / "teacher"))
    with pytest.raises(UserError, match=rf"distill.teacher .* vocabulary of {CFG.vocab_size + 8} tokens, the student "
                                        rf"{CFG.vocab_size}; distillation needs the same tokenizer"):
        make_objective("dms", c, CFG)


def test_frozen_base_trains_only_a_fresh_dms_adapter(corpus, tmp_path):
    """dms.decision='adapter' on a model without one: the train task's prepare hook adds W_a = 0 and a unit norm;
    the real train step then moves the adapter only (the reference's adapter recipe: frozen base)."""
    from dmc_jax.cache import registry

    tmp, data = corpus
    c = _config(data, tmp_path / "run", base_lr_scale=0.0)
    c.dms.update(decision="adapter", decision_scale=1.0, decision_offset=0.0)
    with pytest.raises(UserError, match="needs a model with DMS adapter parameters"):
        make_objective("dms", c, CFG)
    cfg, params0 = registry.load_factory(registry.trained("dms").prepare_model)(
        c, CFG, init_params(CFG, jax.random.PRNGKey(0)))
    assert cfg.dms_adapter and params0["layers"]["dms_adapter"].shape == (CFG.num_layers, CFG.embed_dim,
                                                                         CFG.num_kv_heads)
    obj = make_objective("dms", c, cfg)
    teacher = obj.frozen_inputs(params0)
    s = loop.setup(c, cfg, params0, obj, frozen=teacher)
    p, o, rng = s.init_state(jax.tree.map(jnp.copy, params0), 0)
    frozen = s.put_frozen(teacher)
    for step in range(3):
        p = jax.device_put(obj.on_step(p, step), s.param_shardings)
        p, o, metrics = s.train_step(p, o, s.put_batch(packed_batch(rows=4, seed=step)), rng, jnp.int32(step),
                                     *frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["cr_loss"]) > 0
    after = dict(jax.tree_util.tree_leaves_with_path(p))
    for name, before in jax.tree_util.tree_leaves_with_path(params0):
        key = jax.tree_util.keystr(name)
        if "dms_adapter" in key:
            assert (np.asarray(after[name]) != np.asarray(before)).any(), key
        else:
            np.testing.assert_array_equal(after[name], before, err_msg=key)


def test_train_task_adds_the_adapter_and_exports_a_servable_dms_adapter_model(corpus, tmp_path):
    from dmc_jax.cache import model_method
    from dmc_jax.tasks import train as train_task
    from dmc_jax.weights.hf_io import load_hf_dir
    from tests.test_training import tiny_model

    _, data = corpus
    c = _config(data, tmp_path / "run", base_lr_scale=0.0)
    c.dms.update(decision="adapter")
    c.train.update(steps=2, export_dir=str(tmp_path / "export"))
    c.checkpoint.every_steps = 0
    train_task.run(c, tiny_model())
    cfg, params = load_hf_dir(str(tmp_path / "export"))
    assert cfg.dms_adapter and np.asarray(params["layers"]["dms_adapter"]).any()  # trained from 0
    method = model_method.make(ml_collections.ConfigDict({"model": {"source": str(tmp_path / "export")},
                                                          "cache": {"method": "auto"}}))
    assert method.name == "dms" and method.dms.decision == "adapter" and method.dms.window == 4
