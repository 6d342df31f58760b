"""KV-head compression: SVD-a is exact without RoPE at full rank (t * Dh components), strategy A is exact with
RoPE at full rank, the strategy-B model is an ordinary GQA model every path accepts, and on real SmolLM2
activations the attention error shrinks monotonically with the rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.h2o import H2OCache
from dmc_jax.cache.snapkv import SnapKVCache
from dmc_jax.kv_heads import convert as kvc
from dmc_jax.kv_heads.activations import calibration_grams, layer_qkv
from dmc_jax.kv_heads.error import attention_output_error
from dmc_jax.kv_heads.svd import top_basis
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import check_params, init_params

CFG = tiny_config(head_dim=16)  # 4 query heads on 2 KV heads


def _model(seed=0, cfg=CFG):
    return cfg, jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(seed)))


def _tokens(n, T, seed=1):
    return np.asarray(jax.random.randint(jax.random.PRNGKey(seed), (n, T), 0, CFG.vocab_size), np.int32)


def _through_cache(params, cfg, tokens_BT, method, prompt_len):
    """Logits of every position after the first prompt_len: prefill, then a decode scan (teacher forcing)."""
    B, T = tokens_BT.shape
    tokens_BT = jnp.asarray(tokens_BT)
    state = method.init(cfg, B, T)
    first, state = llama.prefill(params, tokens_BT[:, :prompt_len], jnp.full((B,), prompt_len), state, method, cfg)

    def step(state, t):
        logits, state = llama.decode_step(params, tokens_BT[:, t], jnp.full((B,), t), state, method, cfg)
        return state, logits

    _, rest = jax.lax.scan(step, state, jnp.arange(prompt_len, T - 1))
    return jnp.concatenate([first[None], rest])


@pytest.mark.parametrize("new_kv_heads", [1, 2])
def test_svd_without_rope_is_exact_at_full_rank(new_kv_heads):
    cfg, params = _model()
    t = cfg.num_kv_heads // new_kv_heads
    conv = kvc.convert(cfg, params, "svd_a", new_kv_heads, "B", rank=t * cfg.head_dim, tokens_NT=_tokens(4, 32))
    check_params(conv.cfg, conv.params)
    assert conv.cfg.num_kv_heads == new_kv_heads and conv.cfg.head_dim == t * cfg.head_dim
    tokens = _tokens(2, 24, seed=7)  # not the calibration text
    zeros = jnp.zeros(tokens.shape, jnp.int32)  # every position 0: RoPE is the identity
    want = llama.forward(params, tokens, cfg, positions_BT=zeros)
    got = llama.forward(conv.params, tokens, conv.cfg, positions_BT=zeros)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_rank_below_full_is_not_exact_but_close_to_the_low_rank_algebra():
    cfg, params = _model()
    conv = kvc.convert(cfg, params, "svd_a", 1, "B", rank=cfg.head_dim, tokens_NT=_tokens(4, 32))
    tokens = _tokens(2, 24, seed=7)
    zeros = jnp.zeros(tokens.shape, jnp.int32)
    diff = jnp.abs(llama.forward(conv.params, tokens, conv.cfg, zeros) - llama.forward(params, tokens, cfg, zeros))
    assert float(jnp.max(diff)) > 1e-3


def test_strategy_a_with_rope_is_exact_at_full_rank_through_the_cache():
    cfg, params = _model()
    conv = kvc.convert(cfg, params, "svd_a", 1, "A", rank=2 * cfg.head_dim, tokens_NT=_tokens(4, 32))
    tokens = _tokens(2, 20, seed=5)
    want = _through_cache(llama.unstack_layers(params), cfg, tokens, DenseCache(), 8)
    got = _through_cache(conv.params, conv.cfg, tokens, conv.wrap(DenseCache()), 8)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # The cache holds one KV head of dim 32 instead of two of dim 16: same bytes at full rank.
    assert conv.wrap(DenseCache()).init(conv.cfg, 1, 8)["k"].shape == (cfg.num_layers, 1, 1, 8, 32)


def test_mean_pool_of_identical_heads_is_exact():
    cfg, params = _model()
    layers = dict(params["layers"])
    for name in ("k", "v"):
        layers[name] = np.repeat(layers[name][:, :, :1], cfg.num_kv_heads, axis=2)
    params = {**params, "layers": layers}
    conv = kvc.convert(cfg, params, "mean", 1)
    tokens = _tokens(2, 16)
    np.testing.assert_allclose(llama.forward(conv.params, tokens, conv.cfg), llama.forward(params, tokens, cfg),
                               atol=1e-5)


@pytest.mark.parametrize("method", ["mean", "svd_a", "svd_w"])
def test_strategy_b_is_an_ordinary_gqa_model(tmp_path, method):
    from dmc_jax.weights.hf_io import load_hf_dir, save_hf_dir

    cfg, params = _model()
    conv = kvc.convert(cfg, params, method, 1, "B", tokens_NT=_tokens(4, 32))
    assert conv.exportable and conv.cfg.head_dim == cfg.head_dim and conv.cfg.num_kv_heads == 1
    save_hf_dir(str(tmp_path / "m"), conv.cfg, conv.params)
    cfg2, params2 = load_hf_dir(str(tmp_path / "m"))
    assert cfg2.num_kv_heads == 1
    tokens = _tokens(2, 20, seed=3)
    want = llama.forward(conv.params, tokens, conv.cfg)
    np.testing.assert_allclose(llama.forward(params2, tokens, cfg2), want, atol=1e-5)
    for m in (DenseCache(), H2OCache(budget=8), SnapKVCache(budget=10, window=3)):
        out = _through_cache(llama.unstack_layers(params2), cfg2, tokens, m, 12)
        assert out.shape == (20 - 12, 2, cfg.vocab_size) and bool(jnp.all(jnp.isfinite(out)))


def test_bad_group_is_a_user_error():
    from dmc_jax.errors import UserError

    cfg, params = _model()
    with pytest.raises(UserError, match="new_kv_heads"):
        kvc.convert(cfg, params, "mean", 3)


# ------------------------------------------------------------------------------------------- real SmolLM2

@pytest.fixture(scope="module")
def smollm2():
    from dmc_jax.weights import load_model

    m = load_model("smollm2")
    files = kvc.default_calibration_files()
    tokens = kvc.calibration_tokens(m.tokenizer, files, 6, 256)
    return m, tokens[:4], tokens[4:]  # calibration rows, then rows the bases never saw


def test_error_shrinks_monotonically_with_rank_on_smollm2(smollm2):
    """Attention output error (after W_o) on rows the bases never saw, layers 0, 14, 29, no RoPE and strategy A.

    The cache reconstruction error is monotone by construction (nested subspaces); the attention output error is
    what matters, and is monotone from rank Dh up (below it, at ~100% error, it can wobble)."""
    m, calib, heldout = smollm2
    cfg = m.cfg
    full = llama.unstack_layers(jax.device_put(m.params))
    grams = calibration_grams(full, cfg, [calib[:2], calib[2:]], 1)
    acts = layer_qkv(full, jnp.asarray(heldout), cfg)
    ranks = (64, 96, 128, 160, 192)
    for layer in (0, 14, 29):
        w_o = np.asarray(m.params["layers"]["o"])[layer]
        for strategy, key in (("none", "k"), ("A", "k_rot")):
            errors = [attention_output_error(cfg, w_o, acts["q"][layer], acts["k"][layer], acts["v"][layer],
                                             top_basis(grams[key][layer], r), top_basis(grams["v"][layer], r),
                                             strategy) for r in ranks]
            assert all(b < a for a, b in zip(errors, errors[1:])), (layer, strategy, errors)
            assert errors[-1] < 1e-3, (layer, strategy, errors)  # t * Dh components: exact up to fp32
            k_GA = np.asarray(acts["k"][layer], np.float64).reshape(-1, 3 * cfg.head_dim)
            recon = [np.linalg.norm(k_GA - k_GA @ (p := top_basis(grams["k"][layer], r)[0]) @ p.T) for r in ranks]
            assert all(b < a for a, b in zip(recon, recon[1:]))


def test_convert_kv_heads_task_writes_a_loadable_hf_directory(tmp_path):
    import os

    from dmc_jax.main import main
    from dmc_jax.weights.hf_io import load_hf_dir

    config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smollm2.py")
    base = ["--config", config, "--config.task=convert_kv_heads", "--config.model.source=tiny",
            "--config.model.max_seq_len=0", "--config.kv_heads.calib_sequences=2", "--config.kv_heads.calib_seq_len=32"]
    assert main(base + [f"--config.output_dir={tmp_path / 'run'}"]) == 0
    cfg, params = load_hf_dir(str(tmp_path / "run" / "model"))
    assert cfg.num_kv_heads == 1 and params["layers"]["k"].shape[2] == 1
    assert main(base + [f"--config.output_dir={tmp_path / 'a'}", "--config.kv_heads.rope=A"]) == 2
