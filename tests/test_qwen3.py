"""Qwen3 (per-head q/k RMSNorm, explicit head_dim, RoPE theta 1e6, tied or untied output) against transformers.

Fixtures: tests/fixtures/tiny_qwen3_{tied,untied}/ written by transformers' own save_pretrained and its fp32 logits
(make_qwen3_reference.py, run once in the torch fixture environment).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.cache.dense import DenseCache
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.params import flatten
from dmc_jax.weights import hf_names
from dmc_jax.weights.hf_io import load_hf_dir, save_hf_dir

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
REF = np.load(os.path.join(FIX, "tiny_qwen3_reference.npz"))


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_qwen3_logits_match_transformers(variant):
    cfg, params = load_hf_dir(os.path.join(FIX, f"tiny_qwen3_{variant}"))
    assert cfg.qk_norm and cfg.head_dim == 32 and cfg.embed_dim == 64 and cfg.rope_theta == 1e6
    assert cfg.tie_embeddings == (variant == "tied") and ("lm_head" in params) == (variant == "untied")
    logits = jax.jit(lambda p, t: llama.forward(p, t, cfg))(params, jnp.asarray(REF["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), REF[f"{variant}_logits"], atol=1e-4, rtol=1e-5)


def test_qwen3_decodes_through_a_cache_like_transformers():
    cfg, params = load_hf_dir(os.path.join(FIX, "tiny_qwen3_untied"))
    params, method, ids = llama.unstack_layers(params), DenseCache(), jnp.asarray(REF["input_ids"])
    B, T, P = ids.shape[0], ids.shape[1], 16
    state = method.init(cfg, B, T)
    logits, state = llama.prefill(params, ids[:, :P], jnp.full((B,), P), state, method, cfg)
    got = [logits]
    for t in range(P, T - 1):
        logits, state = llama.decode_step(params, ids[:, t], jnp.full((B,), t), state, method, cfg)
        got.append(logits)
    np.testing.assert_allclose(np.stack(got, 1), REF["untied_logits"][:, P - 1:T - 1], atol=1e-4, rtol=1e-5)


def test_qwen3_round_trips_through_our_writer(tmp_path):
    cfg, params = load_hf_dir(os.path.join(FIX, "tiny_qwen3_tied"))
    save_hf_dir(str(tmp_path / "m"), cfg, params)
    written = json.load(open(tmp_path / "m" / "config.json"))
    assert written["model_type"] == "qwen3" and written["architectures"] == ["Qwen3ForCausalLM"]
    assert "model.layers.1.self_attn.k_norm.weight" in hf_names.hf_shapes(cfg)
    cfg2, params2 = load_hf_dir(str(tmp_path / "m"))
    assert cfg2 == cfg
    for path, w in flatten(params).items():
        np.testing.assert_array_equal(np.asarray(flatten(params2)[path]), np.asarray(w), err_msg=path)


def test_qwen3_sliding_window_and_missing_norms_are_refused():
    d = json.load(open(os.path.join(FIX, "tiny_qwen3_tied", "config.json")))
    with pytest.raises(UserError, match="use_sliding_window"):
        hf_names.config_from_hf({**d, "use_sliding_window": True})
    with pytest.raises(UserError, match="full attention"):
        hf_names.config_from_hf({**d, "layer_types": ["sliding_attention", "full_attention"]})
    cfg = hf_names.config_from_hf(d)
    tensors = {n: np.zeros(s, np.float32) for n, s in hf_names.hf_shapes(cfg).items()}
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    with pytest.raises(UserError, match="q_norm"):
        hf_names.from_hf(cfg, tensors)
    llama_cfg = hf_names.config_from_hf({**d, "model_type": "llama"})
    assert not llama_cfg.qk_norm
    with pytest.raises(UserError, match="q_norm"):  # a Qwen3 checkpoint under a Llama config is not silently run
        hf_names.from_hf(llama_cfg, {**tensors, "model.layers.0.self_attn.q_norm.weight": np.zeros(32)})
