"""DMC inference: the padded cache (prefill + decode) equals the parallel form and the no-cache oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmc_jax.cache.dmc_padded import DMCPaddedCache
from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.errors import UserError
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params
from tests import jitted


def _model(kv_heads=2, layers=2, decision_scale=1.0, seed=0):
    cfg = tiny_config(num_kv_heads=kv_heads, num_layers=layers)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    # Decision logits a = k[ch] - c with c = 0: random signs give a mix of appends and merges.
    params["layers"]["k"] = params["layers"]["k"].at[..., -1].multiply(decision_scale)
    return cfg, params


def _cached_logits(cfg, params, method, tokens_BT, lengths_B, steps):
    """Prefill prompts of lengths_B, then feed tokens_BT[b, lengths_B[b] + i]; logits after every token."""
    state = method.init(cfg, tokens_BT.shape[0], int(lengths_B.max()) + steps)
    prompt_BT = jnp.where(jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None], tokens_BT, 0)
    logits_BV, state = jitted.prefill(params, prompt_BT, lengths_B, state, method=method, cfg=cfg)
    out, batch = [logits_BV], jnp.arange(tokens_BT.shape[0])
    for i in range(steps):
        pos_B = lengths_B + i
        logits_BV, state = jitted.decode_step(params, tokens_BT[batch, pos_B], pos_B, state, method=method, cfg=cfg)
        out.append(logits_BV)
    return out, state


@settings(max_examples=6, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), window=st.sampled_from([None, 1, 3, 12]),
       scale=st.sampled_from([0.5, 3.0]), lengths=st.lists(st.integers(1, 8), min_size=1, max_size=3),
       zero_after_rope=st.booleans(), seed=st.integers(0, 1000))
def test_cache_equals_parallel_form_and_oracle(kv_heads, window, scale, lengths, zero_after_rope, seed):
    cfg, params = _model(kv_heads=kv_heads, decision_scale=scale, seed=seed)
    dmc = DMCConfig(window=window, decision_offset=0.0, mode="hard", zero_after_rope=zero_after_rope)
    steps = 5
    T = max(lengths) + steps
    tokens_BT = jax.random.randint(jax.random.PRNGKey(seed + 1), (len(lengths), T), 0, cfg.vocab_size)
    parallel_BTV, _ = jitted.forward_aux(params, tokens_BT, cfg=cfg, attention=DMCAttention(dmc))
    lengths_B = jnp.asarray(lengths, jnp.int32)
    cached, _ = _cached_logits(cfg, params, DMCPaddedCache(dmc), tokens_BT, lengths_B, steps)
    for i, logits_BV in enumerate(cached):
        pos_B = lengths_B - 1 + i
        np.testing.assert_allclose(logits_BV, parallel_BTV[jnp.arange(len(lengths)), pos_B], atol=1e-4, rtol=1e-4)
        if i in (0, steps):  # the no-cache oracle: the whole prefix recomputed in the parallel form
            p = int(pos_B[0])
            oracle, _ = jitted.forward_aux(params, tokens_BT[:1, :p + 1], cfg=cfg, attention=DMCAttention(dmc))
            np.testing.assert_allclose(logits_BV[0], oracle[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("window", [None, 4])
def test_parallel_prefill_equals_token_by_token_decoding(window):
    cfg, params = _model(decision_scale=2.0)
    dmc = DMCConfig(window=window, decision_offset=0.0)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(5), (2, 20), 0, cfg.vocab_size)
    method = DMCPaddedCache(dmc)
    prefilled, state_a = _cached_logits(cfg, params, method, tokens_BT, jnp.array([14, 9]), 5)
    stepwise, state_b = _cached_logits(cfg, params, method, tokens_BT, jnp.array([1, 1]), 18)
    for i, logits_BV in enumerate(prefilled):
        np.testing.assert_allclose(logits_BV[0], stepwise[13 + i][0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(logits_BV[1], stepwise[8 + i][1], atol=1e-4, rtol=1e-4)


def test_compression_is_real_and_reported():
    cfg, params = _model(decision_scale=3.0)
    dmc = DMCConfig(decision_offset=0.0)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (2, 40), 0, cfg.vocab_size)
    method = DMCPaddedCache(dmc, capacity=32)
    _, state = _cached_logits(cfg, params, method, tokens_BT, jnp.array([20, 20]), 12)
    stats = method.stats(state, jnp.array([32, 32]))
    kept = np.asarray(stats["kept_LBK"])
    assert state["k"].shape[3] == 32 and (kept >= 1).all() and (kept <= 32).all()
    assert 1.3 < 32 / kept.mean() < 3  # the random decisions merge about half the time
    uncapped = DMCPaddedCache(dmc)
    assert stats["bytes_allocated"] < 0.6 * uncapped.stats(uncapped.init(cfg, 2, 64), jnp.zeros(2))["bytes_allocated"]


def test_overflow_is_an_error_naming_layer_and_head_or_merges():
    cfg, params = _model(decision_scale=0.0)  # a = 0 - 0: never > 0, every token appends
    dmc = DMCConfig(decision_offset=0.0)
    prompt = [list(range(1, 6))]
    gen = GenerateConfig(max_new_tokens=8)
    with pytest.raises(UserError, match=r"overflow: layer 0, KV head 0 .*cache\.dmc\.capacity"):
        generate(params, prompt, cfg, DMCPaddedCache(dmc, capacity=8), gen, jax.random.PRNGKey(0))
    with pytest.raises(UserError, match="at prefill: layer 0, KV head 0"):
        generate(params, prompt, cfg, DMCPaddedCache(dmc, capacity=3), gen, jax.random.PRNGKey(0))
    out = generate(params, prompt, cfg, DMCPaddedCache(dmc, capacity=8, on_overflow="merge"), gen,
                   jax.random.PRNGKey(0))
    assert int(out.state["count"].max()) == 8 and int(out.state["overflow"].sum()) > 0
    with pytest.raises(UserError, match=r"cache\.dmc\.on_overflow"):
        DMCPaddedCache(dmc, on_overflow="drop")
