"""The Llama forward pass on random tiny configs: cached decoding equals the full forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from dmc_jax.cache.dense import DenseCache
from dmc_jax.model import llama
from dmc_jax.model.config import RopeScaling, tiny_config
from dmc_jax.model.layers import apply_rope, rope_inv_freq
from dmc_jax.model.params import check_params, init_params, logical_axes
from tests import jitted


def _decode_through_cache(params, cfg, tokens_BT, lengths_B, steps):
    """Prefill each prompt, then feed the following ground-truth tokens one by one; logits of every step."""
    method = DenseCache()
    state = method.init(cfg, tokens_BT.shape[0], tokens_BT.shape[1] + steps)
    prompt_BT = jnp.where(jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None], tokens_BT, 0)
    logits_BV, state = jitted.prefill(params, prompt_BT, lengths_B, state, method=method, cfg=cfg)
    out = [logits_BV]
    batch = jnp.arange(tokens_BT.shape[0])
    for i in range(steps):
        positions_B = lengths_B + i
        logits_BV, state = jitted.decode_step(params, tokens_BT[batch, positions_B], positions_B, state, method=method,
                                             cfg=cfg)
        out.append(logits_BV)
    return out


@settings(max_examples=8, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), layers=st.integers(1, 3), tied=st.booleans(),
       lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_cached_decode_equals_full_forward(kv_heads, layers, tied, lengths, seed):
    cfg = tiny_config(num_kv_heads=kv_heads, num_layers=layers, tie_embeddings=tied)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    steps = 4
    T = max(lengths) + steps
    tokens_BT = jax.random.randint(jax.random.PRNGKey(seed + 1), (len(lengths), T), 0, cfg.vocab_size)
    full_BTV = jitted.forward(params, tokens_BT, cfg=cfg)
    lengths_B = jnp.asarray(lengths, jnp.int32)
    for i, logits_BV in enumerate(_decode_through_cache(params, cfg, tokens_BT, lengths_B, steps)):
        want_BV = full_BTV[jnp.arange(len(lengths)), lengths_B - 1 + i]
        np.testing.assert_allclose(logits_BV, want_BV, atol=2e-5, rtol=2e-5)


def test_padding_tokens_do_not_change_logits():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (1, 6), 0, cfg.vocab_size)
    method = DenseCache()
    outs = []
    for pad in (0, 7):
        padded = jnp.concatenate([tokens, jnp.full((1, 10), pad)], axis=1)
        logits, _ = llama.prefill(params, padded, jnp.array([6]), method.init(cfg, 1, 16), method, cfg)
        outs.append(logits)
    np.testing.assert_array_equal(outs[0], outs[1])


def test_segment_ids_reset_attention():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    a = jax.random.randint(jax.random.PRNGKey(1), (1, 5), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.PRNGKey(2), (1, 7), 0, cfg.vocab_size)
    packed = jnp.concatenate([a, b], axis=1)
    segments = jnp.array([[1] * 5 + [2] * 7])
    positions = jnp.array([list(range(5)) + list(range(7))])
    got = llama.forward(params, packed, cfg, positions_BT=positions, segment_ids_BT=segments)
    np.testing.assert_allclose(got[:, 5:], llama.forward(params, b, cfg), atol=1e-5)
    np.testing.assert_allclose(got[:, :5], llama.forward(params, a, cfg), atol=1e-5)
    leaky = llama.forward(params, packed, cfg, positions_BT=positions)
    assert np.abs(leaky[:, 5:] - got[:, 5:]).max() > 1e-3


def test_rope_is_a_rotation_and_relative():
    inv_freq = rope_inv_freq(16, 10000.0, None)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 1, 1, 16))
    y = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 16))
    rot = lambda v, p: apply_rope(v, jnp.array([[p]]), inv_freq)
    np.testing.assert_allclose(jnp.linalg.norm(rot(x, 7)), jnp.linalg.norm(x), rtol=1e-6)
    # q.k depends only on the distance between positions.
    np.testing.assert_allclose(jnp.sum(rot(x, 9) * rot(y, 4)), jnp.sum(rot(x, 15) * rot(y, 10)), rtol=1e-5)


def test_llama3_rope_scaling_bands():
    base = rope_inv_freq(128, 500000.0, None)
    scaled = rope_inv_freq(128, 500000.0, RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                        original_max_position_embeddings=8192))
    wavelen = 2 * np.pi / np.asarray(base)
    np.testing.assert_allclose(scaled[wavelen < 8192 / 4], base[wavelen < 8192 / 4])       # high freq: kept
    np.testing.assert_allclose(scaled[wavelen > 8192], base[wavelen > 8192] / 8, rtol=1e-6)  # low freq: / factor
    mid = (wavelen >= 8192 / 4) & (wavelen <= 8192)
    assert np.all(scaled[mid] <= base[mid]) and np.all(scaled[mid] >= base[mid] / 8)


def test_params_carry_logical_axes_and_match_config():
    cfg = tiny_config(tie_embeddings=False)
    boxed = init_params(cfg, jax.random.PRNGKey(0), boxed=True)
    axes = logical_axes(cfg)
    assert boxed["layers"]["q"].names == ("layers", "embed", "heads", "head_dim")
    assert tuple(axes["lm_head"]) == ("embed", "vocab")
    check_params(cfg, init_params(cfg, jax.random.PRNGKey(0)))


def test_bf16_compute_stays_close_to_fp32():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    ref = llama.forward(params, tokens, cfg)
    low = llama.forward(params, tokens, cfg.replace(compute_dtype="bfloat16"))
    assert low.dtype == jnp.float32
    assert np.abs(np.asarray(low) - np.asarray(ref)).max() < 0.1 * np.abs(np.asarray(ref)).max()


def test_unstacked_decoding_layout_gives_the_same_logits():
    cfg = tiny_config(num_layers=3)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
    np.testing.assert_allclose(llama.forward(llama.unstack_layers(params), tokens, cfg),
                               llama.forward(params, tokens, cfg), atol=1e-5)


def test_weights_cast_once_to_the_compute_dtype_decode_bit_identically():
    """llama.compute_dtype_weights (what task compare decodes with) only moves dense's per-use cast out of the loop:
    the same bits in both layouts; norms stay fp32; an fp32 model is returned as is."""
    from dmc_jax.cache.h2o import H2OCache
    from dmc_jax.evaluation.decode_perplexity import nll_through_cache

    cfg = tiny_config(num_layers=2, compute_dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 0, cfg.vocab_size)
    for layout in (params, llama.unstack_layers(params)):
        cast = llama.compute_dtype_weights(layout, cfg)
        stacked = llama.stack_layers(cast)["layers"]
        assert stacked["q"].dtype == jnp.bfloat16 and stacked["attn_norm"].dtype == jnp.float32
        assert cast["embed"]["embedding"].dtype == jnp.bfloat16
        want, _ = nll_through_cache(layout, tokens_BT, H2OCache(budget=8), cfg, 4)
        got, _ = nll_through_cache(cast, tokens_BT, H2OCache(budget=8), cfg, 4)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    fp32 = tiny_config(num_layers=2)
    assert llama.compute_dtype_weights(params, fp32) is params
