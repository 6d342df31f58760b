"""Teacher forcing layer by layer (llama.decode_forced) gives what token-by-token decoding gives, for every method
whose state is all per layer; the methods whose layers share a page pool are refused and decoded token by token,
and the decoded perplexity is the same number either way."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache import registry
from dmc_jax.evaluation import decode_perplexity as dp
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params
from tests import jitted


def _model(dms_adapter=False):
    cfg = tiny_config(num_kv_heads=2, num_heads=4, dms_adapter=dms_adapter)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # DMC reads its decisions from the last key channel: random signs give a mix of appends and merges.
    params["layers"]["k"] = params["layers"]["k"].at[..., -1].multiply(2.0)
    if dms_adapter:  # the adapter starts at zero (nothing evicted); random weights make it decide
        params["layers"]["dms_adapter"] = 0.5 * jax.random.normal(jax.random.PRNGKey(3),
                                                                  params["layers"]["dms_adapter"].shape)
    return cfg, params


def _method(name, **dms):
    cache = ml_collections.ConfigDict({"method": name, "budget": 10, "snapkv": {"window": 4},
                                       "corm": {"window": 2, "recent": 4}, "corm_capped": {"window": 2, "recent": 4}})
    hparams, trained = None, registry.get(name).trained
    if trained is not None:
        hparams = registry.trained_defaults(trained.section)
        if trained.section in ("dmc", "dms"):  # offset 0 and a short window: merges / evictions within 32 tokens
            hparams.update(dict(decision_offset=0.0, window=3, **dms))
    return registry.build(name, cache, hparams)


def _token_by_token(params, tokens_BT, prefix, method, cfg):
    B, T = tokens_BT.shape
    state = method.init(cfg, B, T)
    _, state = jitted.prefill(params, tokens_BT[:, :prefix], jnp.full((B,), prefix), state, method=method, cfg=cfg)
    logits = []
    for t in range(prefix, T):
        out, state = jitted.decode_step(params, tokens_BT[:, t], jnp.full((B,), t), state, method=method, cfg=cfg)
        logits.append(out)
    return jnp.stack(logits, axis=1), state


def _layer_by_layer(params, tokens_BT, prefix, method, cfg):
    B, T = tokens_BT.shape
    state = method.init(cfg, B, T)
    _, state = jitted.prefill(params, tokens_BT[:, :prefix], jnp.full((B,), prefix), state, method=method, cfg=cfg)
    positions_BN = jnp.broadcast_to(jnp.arange(prefix, T), (B, T - prefix))

    @jax.jit
    def run(params, tokens_BN, state):
        x_BND, state = llama.decode_forced(params, tokens_BN, positions_BN, state, method, cfg)
        return llama.output_logits(params, x_BND, cfg), state

    return run(params, tokens_BT[:, prefix:], state)


INDEPENDENT = [n for n in registry.names() if llama.layers_independent(_method(n))]


def test_the_paged_caches_share_a_pool_across_layers_and_the_others_do_not():
    assert {"dmc_paged", "dms_paged"} <= set(registry.names()) - set(INDEPENDENT)
    assert {"dense", "h2o", "tova", "streaming_llm", "snapkv", "dms"} <= set(INDEPENDENT)
    cfg, params = _model()
    with pytest.raises(ValueError, match="shares state across layers"):
        llama.decode_forced(params, jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32),
                            _method("dms_paged").init(cfg, 1, 4), _method("dms_paged"), cfg)


@pytest.mark.parametrize("name", INDEPENDENT)
def test_layer_by_layer_equals_token_by_token(name):
    cfg, params = _model()
    method = _method(name)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 1, cfg.vocab_size)
    want, want_state = _token_by_token(params, tokens_BT, 6, method, cfg)
    got, got_state = _layer_by_layer(params, tokens_BT, 6, method, cfg)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)
    # The budget / merges really bite in these 32 tokens: the logits differ from the dense cache's.
    if name != "dense":
        dense, _ = _layer_by_layer(params, tokens_BT, 6, _method("dense"), cfg)
        assert float(jnp.max(jnp.abs(got - dense))) > 1e-3


def test_a_dms_adapter_reaches_the_cache_layer_by_layer():
    cfg, params = _model(dms_adapter=True)
    method = _method("dms", decision="adapter")
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (2, 32), 1, cfg.vocab_size)
    want, want_state = _token_by_token(params, tokens_BT, 5, method, cfg)
    got, got_state = _layer_by_layer(params, tokens_BT, 5, method, cfg)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    zero = {**params, "layers": {**params["layers"],
                                 "dms_adapter": jnp.zeros_like(params["layers"]["dms_adapter"])}}
    plain, _ = _layer_by_layer(zero, tokens_BT, 5, method, cfg)
    assert float(jnp.max(jnp.abs(got - plain))) > 1e-3  # the adapter's decisions changed what was kept


@pytest.mark.parametrize("name", ["h2o", "snapkv"])
def test_decoded_perplexity_is_the_same_number_in_either_order(name):
    cfg, params = _model()
    method = _method(name)
    rows = jax.random.randint(jax.random.PRNGKey(4), (3, 40), 1, cfg.vocab_size)
    by_token, stats_t = dp.nll_through_cache(params, rows, method, cfg, 4, "token")
    by_layer, stats_l = dp.nll_through_cache(params, rows, method, cfg, 4, "layer")
    auto, _ = dp.nll_through_cache(params, rows, method, cfg, 4)
    np.testing.assert_allclose(by_layer, by_token, atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(auto, by_layer)
    for key in ("kept_LBK", "bytes_allocated"):
        np.testing.assert_array_equal(stats_l[key], stats_t[key])


def test_a_cache_whose_layers_share_a_pool_is_decoded_token_by_token():
    cfg, params = _model()
    method = _method("dms_paged")
    rows = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (2, 40), 1, cfg.vocab_size))
    res = dp.decode_perplexity(params, rows, method, cfg, 4, 2)
    by_token, _ = dp.nll_through_cache(params, jnp.asarray(rows), method, cfg, 4, "token")
    assert res.perplexity == pytest.approx(float(np.exp(np.mean(np.asarray(by_token, np.float64)))), rel=1e-6)
    with pytest.raises(ValueError, match="order must be one of"):
        dp.nll_through_cache(params, jnp.asarray(rows), method, cfg, 4, "sideways")
