"""A DMC/DMS-trained model served by another cache method (dense, an eviction policy) runs its trained attention
with nothing compressed: the decision channel zeroed as the trained form zeroes it (cache/zeroed_channel.py)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache import model_method, registry
from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.tova import TOVACache
from dmc_jax.cache.zeroed_channel import ZeroedChannel
from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.dmc.config import default_section as dmc_section, from_section as dmc_from_section
from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import default_section as dms_section, from_section as dms_from_section
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params
from tests.jitted import prefill_then_decode

def _model(kv_heads, seed=0):
    cfg = tiny_config(num_kv_heads=kv_heads, num_heads=4, max_seq_len=64)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    # Make the decision channel loud (as training leaves it): scale the weights that write channel ch of q and k.
    layers = dict(params["layers"])
    for name in ("q", "k"):
        w = np.array(layers[name])  # [L, D, N, Dh]
        w[..., cfg.head_dim - 3] *= 40.0
        layers[name] = jnp.asarray(w)
    return cfg, {**params, "layers": layers}


def _section(kind, **kw):
    section = (dms_section() if kind == "dms" else dmc_section()).copy_and_resolve_references()
    section.update(decision_channel=-3, **kw)
    return section


def _oracle(kind, section):
    """The trained attention with nothing compressed (every DMS token kept, every DMC decision 'append')."""
    if kind == "dms":
        return DMSAttention(dms_from_section(section).replace(mode="keep"))
    return DMCAttention(dmc_from_section(section).replace(mode="append"))


@pytest.mark.parametrize("kind", ["dms", "dmc"])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("after_rope", [True, False])
def test_another_cache_serves_the_trained_attention(kind, kv_heads, after_rope):
    cfg, params = _model(kv_heads)
    section = _section(kind, zero_after_rope=after_rope)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, cfg.vocab_size)
    want_BTV = np.asarray(llama.forward_aux(params, tokens_BT, cfg, attention=_oracle(kind, section))[0])[:, 4:]
    wrap = registry.get(kind).trained.other_cache(section)
    got = prefill_then_decode(params, cfg, wrap(DenseCache()), tokens_BT, 5)[0]
    np.testing.assert_allclose(got, want_BTV, atol=2e-4, rtol=2e-4)
    # The channel matters: served plainly, the same weights give other logits (so the test can fail).
    plain = prefill_then_decode(params, cfg, DenseCache(), tokens_BT, 5)[0]
    assert np.max(np.abs(plain - want_BTV)) > 1e-2


def test_an_eviction_policy_with_room_for_everything_matches_too():
    cfg, params = _model(2)
    section = _section("dms")
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (2, 10), 0, cfg.vocab_size)
    want_BTV = np.asarray(llama.forward_aux(params, tokens_BT, cfg, attention=_oracle("dms", section))[0])[:, 3:]
    method = registry.get("dms").trained.other_cache(section)(TOVACache(budget=16))
    assert method.name == "tova" and method.layout == TOVACache(budget=16).layout
    np.testing.assert_allclose(prefill_then_decode(params, cfg, method, tokens_BT, 4)[0], want_BTV, atol=2e-4,
                               rtol=2e-4)


def test_an_adapter_model_needs_nothing():
    assert registry.get("dms").trained.other_cache(_section("dms", decision="adapter")) is None


def _saved_model(tmp_path, method, section):
    cfg, params = _model(2)
    path = str(tmp_path / "m")
    model_method.save(path, cfg, jax.tree.map(np.asarray, params), None, method, section)
    return path


@pytest.mark.parametrize("method, wrapped", [("dense", True), ("tova", True), ("h2o", True), ("dms", False),
                                             ("dms_paged", False)])
def test_resolve_wraps_only_methods_of_another_section(tmp_path, method, wrapped):
    path = _saved_model(tmp_path, "dms", _section("dms", window=4, target_cr=4.0))
    config = ml_collections.ConfigDict({"model": {"source": path}, "cache": registry.default_config()})
    resolved = model_method.resolve(config, method)
    assert (resolved.wrap is not None) == wrapped
    if method in ("dense", "tova", "h2o"):
        made = resolved.make(**({} if method == "dense" else {"budget": 8}))
        assert isinstance(made, ZeroedChannel) and made.name == method and made.first_of_group and not made.keys


def test_a_plain_model_is_never_wrapped():
    config = ml_collections.ConfigDict({"model": {"source": "tiny"}, "cache": registry.default_config()})
    assert model_method.resolve(config, "tova").wrap is None


def test_a_trained_method_of_another_family_is_refused(tmp_path):
    path = _saved_model(tmp_path, "dms", _section("dms", window=4, target_cr=4.0))
    config = ml_collections.ConfigDict({"model": {"source": path}, "cache": registry.default_config()})
    with pytest.raises(UserError, match="trained for dms; cache method 'dmc_paged' needs a model trained for dmc"):
        model_method.resolve(config, "dmc_paged")
