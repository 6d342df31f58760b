"""DMS: the delayed-eviction training form == the token-by-token cache == the no-cache oracles; the cache's bytes
follow the budget; the objective's surgery, ramp and errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmc_jax.cache.dms import DMSCache, capacity_for
from dmc_jax.cache.protocol import state_bytes
from dmc_jax.cache.dense import DenseCache
from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import DMSConfig
from dmc_jax.dms.decisions import read_decision, zero_decision_heads
from dmc_jax.dms import objective as dms_objective
from dmc_jax.dms.reference import sequential_dms
from dmc_jax.errors import UserError
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params


def _model(kv_heads=2, seed=0, max_seq_len=256):
    cfg = tiny_config(num_kv_heads=kv_heads, num_heads=4, max_seq_len=max_seq_len)
    return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def _hard(window, **kw):
    # offset 0, scale 1: the sign of a random q channel, so a mix of kept and marked tokens
    return DMSConfig(window=window, decision_scale=kw.get("scale", 1.0), decision_offset=kw.get("offset", 0.0),
                     mode="hard")


@settings(max_examples=6, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), window=st.sampled_from([0, 1, 3, 7]), T=st.integers(2, 14),
       seed=st.integers(0, 1000))
def test_parallel_form_equals_the_definition(kv_heads, window, T, seed):
    cfg = tiny_config(num_kv_heads=kv_heads, num_heads=4)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = jax.random.normal(keys[0], (2, T, 4, cfg.head_dim))
    k = jax.random.normal(keys[1], (2, T, kv_heads, cfg.head_dim))
    v = jax.random.normal(keys[2], (2, T, kv_heads, cfg.head_dim))
    dms, rope = _hard(window), Rope(cfg)
    pos = jnp.broadcast_to(jnp.arange(T), (2, T))
    out, aux = DMSAttention(dms)(0, q, k, v, pos, None, rope, None)
    a, qz = read_decision(q, kv_heads, dms)
    marks = (a > 0).at[:, 0].set(False)
    np.testing.assert_allclose(np.asarray(aux["alpha_st_BTK"]), np.asarray(marks, np.float32), atol=1e-6)
    qr = zero_decision_heads(rope(qz, pos), kv_heads, cfg.head_dim - 1)
    ref, _ = sequential_dms(qr, rope(k, pos), v, marks, window)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=2e-5)


_prefill = jax.jit(llama.prefill, static_argnames=("method", "cfg"))
_decode = jax.jit(llama.decode_step, static_argnames=("method", "cfg"))


def _cached_logits(cfg, params, method, tokens_BT, lengths_B, steps):
    """Prefill prompts of lengths_B, then feed tokens_BT[b, lengths_B[b] + i]; logits after every token."""
    state = method.init(cfg, tokens_BT.shape[0], int(lengths_B.max()) + steps)
    prompt_BT = jnp.where(jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None], tokens_BT, 0)
    logits_BV, state = _prefill(params, prompt_BT, lengths_B, state, method=method, cfg=cfg)
    out, batch = [logits_BV], jnp.arange(tokens_BT.shape[0])
    for i in range(steps):
        pos_B = lengths_B + i
        logits_BV, state = _decode(params, tokens_BT[batch, pos_B], pos_B, state, method=method, cfg=cfg)
        out.append(logits_BV)
    return out, state


@settings(max_examples=5, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), window=st.sampled_from([0, 1, 2, 5]),
       lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3), seed=st.integers(0, 1000))
def test_cache_equals_parallel_form_and_oracle(kv_heads, window, lengths, seed):
    cfg, params = _model(kv_heads=kv_heads, seed=seed)
    dms = _hard(window)
    steps = 5
    T = max(lengths) + steps
    tokens_BT = jax.random.randint(jax.random.PRNGKey(seed + 1), (len(lengths), T), 0, cfg.vocab_size)
    parallel_BTV, aux = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(dms))
    lengths_B = jnp.asarray(lengths, jnp.int32)
    cached, state = _cached_logits(cfg, params, DMSCache(dms), tokens_BT, lengths_B, steps)
    assert not np.asarray(state["overflow"]).any() and not np.asarray(state["lost"]).any()
    for i, logits_BV in enumerate(cached):
        pos_B = lengths_B - 1 + i
        np.testing.assert_allclose(logits_BV, parallel_BTV[jnp.arange(len(lengths)), pos_B], atol=1e-4, rtol=1e-4)
        if i in (0, steps):  # the no-cache oracle: the whole prefix recomputed in the parallel form
            p = int(pos_B[0])
            oracle, _ = llama.forward_aux(params, tokens_BT[:1, :p + 1], cfg, attention=DMSAttention(dms))
            np.testing.assert_allclose(logits_BV[0], oracle[0, -1], atol=1e-4, rtol=1e-4)
    # The cache holds exactly the keys the definition leaves visible to the last query of sequence 0.
    marks_LTK = np.asarray(aux["alpha_st_BTK"])[:, 0]
    last = int(lengths_B[0]) - 1 + steps
    for layer in range(cfg.num_layers):
        for kh in range(kv_heads):
            expect = sum(1 for j in range(last + 1) if last - j <= window or not marks_LTK[layer, j + 1, kh])
            assert int((np.asarray(state["pos"])[layer, 0, kh] >= 0).sum()) == expect


@pytest.mark.parametrize("window", [0, 3])
def test_parallel_prefill_equals_token_by_token_decoding(window):
    cfg, params = _model()
    method = DMSCache(_hard(window))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(5), (2, 20), 0, cfg.vocab_size)
    prefilled, a = _cached_logits(cfg, params, method, tokens_BT, jnp.array([14, 9]), 5)
    stepwise, b = _cached_logits(cfg, params, method, tokens_BT, jnp.array([1, 1]), 18)
    for i, logits_BV in enumerate(prefilled):
        np.testing.assert_allclose(logits_BV[0], stepwise[13 + i][0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(logits_BV[1], stepwise[8 + i][1], atol=1e-4, rtol=1e-4)


def test_never_marked_is_the_dense_model_without_the_decision_channel():
    cfg, params = _model()
    tokens_BT = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, cfg.vocab_size)
    never = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(_hard(2, offset=1e6)))[0]
    keep = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(DMSConfig(window=2, mode="keep")))[0]
    np.testing.assert_array_equal(never, keep)
    layers = dict(params["layers"])
    layers["q"] = layers["q"].at[..., ::cfg.group_size, -1].set(0)  # the channel gone from q.k: vanilla attention
    vanilla = llama.forward(dict(params, layers=layers), tokens_BT, cfg)
    # (zeroing after RoPE too also drops the partner channel's sine term: compare without it)
    keep = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(
        DMSConfig(window=2, mode="keep", zero_after_rope=False)))[0]
    np.testing.assert_allclose(keep, vanilla, atol=1e-5, rtol=1e-5)


def test_bytes_follow_the_budget_and_slots_are_reused():
    cfg, params = _model()
    dms = _hard(4, offset=-1e6)  # every token marks its predecessor: the cache holds the last w + 1 tokens
    method = DMSCache(dms, target_cr=4.0)
    assert capacity_for(200, 4, 0, 4.0, 1.25) == 61 + 5  # ceil((200 - 5) / 4 * 1.25) + w + 1
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (1, 64), 0, cfg.vocab_size)
    _, state = _cached_logits(cfg, params, method, tokens_BT, jnp.array([20]), 40)
    C = state["pos"].shape[-1]
    assert C == capacity_for(60, 4, 0, 4.0, 1.25) < 60
    assert state_bytes(state) < state_bytes(DenseCache().init(cfg, 1, 60)) / 2
    stats = method.stats(state, jnp.array([60]))
    np.testing.assert_array_equal(stats["kept_LBK"], 5.0)  # w + 1
    assert float(stats["compression_ratio"]) == 12.0
    method.check(state)


def test_overflow_is_never_silent():
    cfg, params = _model()
    method = DMSCache(_hard(2, offset=1e6), capacity=8)  # nothing is ever marked: 8 slots cannot hold 20 tokens
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (1, 24), 0, cfg.vocab_size)
    _, state = _cached_logits(cfg, params, method, tokens_BT, jnp.array([4]), 16)
    assert int(np.asarray(state["overflow"]).max()) == 12
    with pytest.raises(UserError, match="DMS cache overflow: layer 0"):
        method.check(state)
    DMSCache(method.dms, capacity=8, on_overflow="evict").check(state)
    _, state = _cached_logits(cfg, params, method, tokens_BT, jnp.array([12]), 1)
    with pytest.raises(UserError, match="at prefill"):
        method.check(state)


def test_serving_threshold_trades_compression_for_keeping_more():
    """cache.dms.threshold moves the decision boundary of the same model: a higher threshold never keeps fewer tokens
    per head, a huge one keeps every token, and threshold t on offset o equals threshold 0 on offset o + t."""
    from dmc_jax.cache import registry

    cfg, params = _model()
    tokens_BT = jax.random.randint(jax.random.PRNGKey(4), (1, 40), 0, cfg.vocab_size)
    kept = []
    for t in (-0.5, 0.0, 0.5, 1e6):
        _, state = _cached_logits(cfg, params, DMSCache(_hard(3), threshold=t), tokens_BT, jnp.array([12]), 20)
        kept.append(np.asarray(state["pos"]) >= 0)
    assert all((a <= b).all() for a, b in zip(kept, kept[1:])) and kept[0].sum() < kept[2].sum()
    assert kept[-1].sum() == kept[-1].size == cfg.num_layers * cfg.num_kv_heads * 32
    shifted, _ = _cached_logits(cfg, params, DMSCache(_hard(3, offset=0.5)), tokens_BT, jnp.array([12]), 20)
    thresh, _ = _cached_logits(cfg, params, DMSCache(_hard(3), threshold=0.5), tokens_BT, jnp.array([12]), 20)
    np.testing.assert_array_equal(np.stack(shifted), np.stack(thresh))
    from dmc_jax.dms.config import default_section

    section = registry.default_config()
    section.dms.threshold = 0.5
    hparams = default_section()
    hparams.window = 3
    assert registry.build("dms", section, hparams).threshold == 0.5
    with pytest.raises(UserError, match="cache.dms.threshold"):
        DMSCache(_hard(3), threshold=float("nan"))


def test_serving_window_replaces_the_trained_window_and_bad_values_are_user_errors():
    """cache.<dms|dms_paged>.window = w' serves the model trained with w exactly as a model trained with w' (the same
    logits and kept slots, the buffer sized from w'); 0 keeps the trained window."""
    from dmc_jax.cache import registry
    from dmc_jax.dms.config import default_section

    cfg, params = _model()
    tokens_BT = jax.random.randint(jax.random.PRNGKey(5), (1, 40), 0, cfg.vocab_size)
    hparams = default_section()
    hparams.update(window=3, decision_scale=1.0, decision_offset=0.0)
    for name in ("dms", "dms_paged"):
        section = registry.default_config()
        section[name].window = 6
        section[name].target_cr = 2.0
        served = registry.build(name, section, hparams)
        assert served.dms.window == 6 and registry.build(name, registry.default_config(), hparams).dms.window == 3
        hparams6 = default_section()
        hparams6.update(window=6, decision_scale=1.0, decision_offset=0.0)
        section[name].window = 0
        trained6 = registry.build(name, section, hparams6)
        got, s_got = _cached_logits(cfg, params, served, tokens_BT, jnp.array([12]), 20)
        want, s_want = _cached_logits(cfg, params, trained6, tokens_BT, jnp.array([12]), 20)
        np.testing.assert_array_equal(np.stack(got), np.stack(want))
        assert jax.tree.map(np.shape, s_got) == jax.tree.map(np.shape, s_want)
        trained3, _ = _cached_logits(cfg, params, registry.build(name, section, hparams), tokens_BT,
                                     jnp.array([12]), 20)
        assert np.abs(np.stack(trained3) - np.stack(got)).max() > 1e-3  # the window matters on this model
        section[name].window = -1
        with pytest.raises(UserError, match="window must be an int >= 0"):
            registry.build(name, section, hparams)


def test_generate_through_the_cache():
    cfg, params = _model()
    out = generate(llama.unstack_layers(params), [[5, 6, 7], [9]], cfg, DMSCache(_hard(2), target_cr=2.0),
                   GenerateConfig(max_new_tokens=6, stop_ids=()), jax.random.PRNGKey(0))
    assert [len(t) for t in out.tokens] == [6, 6]


def test_window_not_shorter_than_the_context_is_an_error():
    cfg, _ = _model(max_seq_len=64)
    with pytest.raises(UserError, match=r"dms.window=64 is not shorter than the model's context"):
        DMSCache(DMSConfig(window=64)).init(cfg, 1, 32)
    c = ml_collections.ConfigDict({"dms": dms_objective.default_config(), "data": {"seq_len": 256}})
    with pytest.raises(UserError, match=r"dms.window=512 is not shorter than data.seq_len=256"):
        dms_objective.make(c, cfg)


def test_objective_surgery_ramp_and_gradient():
    cfg, params = _model()
    c = dms_objective.default_config()
    c.update(window=4, target_cr=4.0, ramp_steps=10)
    obj = dms_objective.make(ml_collections.ConfigDict({"dms": c, "data": {"seq_len": 32}}), cfg)
    params = obj.on_step(params, 0)
    assert not np.asarray(params["layers"]["q"][..., ::cfg.group_size, -1]).any()
    assert np.asarray(params["layers"]["q"][..., 1, -1]).any()  # other heads keep the channel
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens), "positions": jnp.broadcast_to(jnp.arange(32),
                                                                                                  (2, 32))}
    loss, m = obj.loss(params, batch, None, 0)
    assert float(m["cr"]) == 1.0 and float(m["cr_target"]) == 1.0  # a = -5: nothing evicted at the start
    _, m = obj.loss(params, batch, None, 5)
    np.testing.assert_allclose(float(m["cr_target"]), 2.5)
    assert float(m["cr_loss"]) > 0
    grads = jax.grad(lambda p: obj.loss(p, batch, jax.random.PRNGKey(0), 5)[0])(params)
    g = np.asarray(grads["layers"]["q"][..., ::cfg.group_size, -1])
    assert np.abs(g).max() > 0  # the compression loss reaches the decision columns through the straight-through

    c.update(target_cr=8.0, ramp_from_step=100, ramp_from_cr=4.0)  # continued to CR 8 from another run's step 100
    later = dms_objective.make(ml_collections.ConfigDict({"dms": c, "data": {"seq_len": 32}}), cfg)
    for step, expected in [(50, 4.0), (100, 4.0), (105, 6.0), (110, 8.0), (500, 8.0)]:
        np.testing.assert_allclose(float(later.loss(params, batch, None, step)[1]["cr_target"]), expected)
    c.update(ramp_from_cr=9.0)
    with pytest.raises(UserError, match="1 <= dms.ramp_from_cr <= dms.target_cr"):
        dms_objective.make(ml_collections.ConfigDict({"dms": c, "data": {"seq_len": 32}}), cfg)


def test_config_validates_and_registers_the_cache():
    import os

    from dmc_jax import config_schema
    from dmc_jax.cache import model_method
    from dmc_jax.config_loader import load_config_file

    c = load_config_file(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "smollm2_dms.py"))
    config_schema.validate(c)
    method = model_method.make(c)  # the config's dms section: the trained hyper-parameters
    assert isinstance(method, DMSCache) and method.dms.window == c.dms.window == 16
    assert method.dms.decision_channel == 20 and method.target_cr == 4.0
    c.dms.window = 256
    with pytest.raises(UserError, match="dms.window=256 is not shorter than data.seq_len=256"):
        config_schema.validate(c)


# ------------------------------------------------------------------------------------------ decision adapter
def _adapter_model(seed=0):
    """A tiny model with DMS adapters whose raw logits straddle offset / scale (a mix of kept and marked tokens)."""
    cfg = tiny_config(num_kv_heads=2, num_heads=4, dms_adapter=True)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    assert not np.asarray(params["layers"]["dms_adapter"]).any()  # initialized to 0: nothing marked at the start
    layers = dict(params["layers"])
    layers["dms_adapter"] = 0.3 * jax.random.normal(jax.random.PRNGKey(seed + 7), layers["dms_adapter"].shape)
    return cfg, dict(params, layers=layers)


def _adapter(window):
    return DMSConfig(window=window, decision_scale=1.0, decision_offset=0.0, mode="hard", decision="adapter")


@pytest.mark.parametrize("window", [0, 3])
def test_adapter_cache_equals_parallel_form_and_token_by_token(window):
    cfg, params = _adapter_model()
    dms = _adapter(window)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(4), (2, 20), 0, cfg.vocab_size)
    parallel_BTV, aux = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(dms))
    marks = np.asarray(aux["alpha_st_BTK"])[:, :, 1:]
    assert 0.2 < marks.mean() < 0.8
    method, lengths_B = DMSCache(dms), jnp.array([14, 9])
    prefilled, state = _cached_logits(cfg, params, method, tokens_BT, lengths_B, 5)
    stepwise, _ = _cached_logits(cfg, params, method, tokens_BT, jnp.array([1, 1]), 18)
    assert not np.asarray(state["overflow"]).any() and not np.asarray(state["lost"]).any()
    from dmc_jax.cache.dms_paged import DMSPagedCache

    paged, _ = _cached_logits(cfg, params, DMSPagedCache(dms), tokens_BT, lengths_B, 5)  # the paged cache too
    np.testing.assert_allclose(np.stack(paged), np.stack(prefilled), atol=1e-5, rtol=1e-5)
    for i, logits_BV in enumerate(prefilled):
        np.testing.assert_allclose(logits_BV, parallel_BTV[jnp.arange(2), lengths_B - 1 + i], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(logits_BV[0], stepwise[13 + i][0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(logits_BV[1], stepwise[8 + i][1], atol=1e-4, rtol=1e-4)
    # the adapter reads the layer input, not q: the q-channel form gives other decisions on the same weights
    q_aux = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(_hard(window)))[1]
    assert (np.asarray(q_aux["alpha_st_BTK"]) != np.asarray(aux["alpha_st_BTK"])).any()


def test_adapter_decisions_are_the_adapter_of_the_layer_input():
    cfg, params = _adapter_model(seed=3)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, cfg.vocab_size)
    dms = _adapter(2).replace(decision_scale=100.0, decision_offset=5.0)
    _, aux = llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(dms))
    # layer 0's input is the embedding: a = (RMSNorm_a(x) @ W_a) * scale - offset, computed here by hand in numpy
    x = np.asarray(params["embed"]["embedding"])[np.asarray(tokens_BT[0])]
    w = params["layers"]
    n = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * np.asarray(w["dms_adapter_norm"][0])
    a = n @ np.asarray(w["dms_adapter"][0]) * 100.0 - 5.0
    np.testing.assert_array_equal(np.asarray(aux["alpha_st_BTK"])[0, 0, 1:] > 0.5, a[1:] > 0)


def test_adapter_objective_trains_only_the_adapter():
    from dmc_jax.training.distill import _freeze

    cfg, params = _adapter_model()
    c = dms_objective.default_config()
    c.update(window=4, target_cr=4.0, ramp_steps=10, decision="adapter")
    obj = dms_objective.make(ml_collections.ConfigDict({"dms": c, "data": {"seq_len": 32}}), cfg)
    params0 = obj.on_step(params, 0)
    assert not np.asarray(params0["layers"]["dms_adapter"]).any()  # step 0: a = -offset, nothing evicted
    np.testing.assert_array_equal(params0["layers"]["q"], params["layers"]["q"])  # W_q untouched
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(32), (2, 32))}
    mask = obj.decision_mask(params)
    grads = jax.grad(lambda p: obj.loss(_freeze(p, mask, 1.0), batch, jax.random.PRNGKey(0), 5)[0])(params)
    assert np.abs(np.asarray(grads["layers"]["dms_adapter"])).max() > 0
    assert np.abs(np.asarray(grads["layers"]["dms_adapter_norm"])).max() > 0
    for path in ("q", "k", "v", "o", "gate", "attn_norm"):
        assert not np.asarray(grads["layers"][path]).any(), path  # frozen base: only the adapter trains
    plain_cfg, _ = _model()
    with pytest.raises(UserError, match="dms.decision='adapter' needs a model with DMS adapter parameters"):
        dms_objective.make(ml_collections.ConfigDict({"dms": c, "data": {"seq_len": 32}}), plain_cfg)
    with pytest.raises(UserError, match="the model has no DMS adapter"):
        llama.forward_aux(init_params(plain_cfg, jax.random.PRNGKey(0)), tokens, plain_cfg,
                          attention=DMSAttention(_adapter(2)))


def test_adapter_model_runs_dense_and_round_trips_through_our_writer(tmp_path):
    from dmc_jax.model.params import flatten
    from dmc_jax.weights.hf_io import load_hf_dir, save_hf_dir

    cfg, params = _adapter_model()
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (1, 12), 0, cfg.vocab_size)
    plain = dict(params, layers={k: v for k, v in params["layers"].items() if not k.startswith("dms_adapter")})
    np.testing.assert_array_equal(llama.forward(params, tokens_BT, cfg),
                                  llama.forward(plain, tokens_BT, cfg.replace(dms_adapter=False)))
    save_hf_dir(str(tmp_path / "m"), cfg, params)
    cfg2, params2 = load_hf_dir(str(tmp_path / "m"))
    assert cfg2.dms_adapter
    for path, w in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(params2)[path]), np.asarray(w), err_msg=path)
