"""Sliding-window perplexity: window bookkeeping, agreement with a direct computation, DMC compression."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.errors import UserError
from dmc_jax.evaluation.perplexity import perplexity, windows
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params


@given(n=st.integers(2, 200), window=st.integers(2, 40), stride_frac=st.floats(0.05, 1.0))
def test_windows_score_every_token_once_with_context(n, window, stride_frac):
    stride = max(1, int(window * stride_frac))
    wins = windows(n, window, stride)
    scored = [t for begin, end, first in wins for t in range(first, end)]
    assert len(scored) == len(set(scored))
    assert all(end - begin <= window and first > begin for begin, end, first in wins)
    if stride < window:
        assert sorted(scored) == list(range(1, n))  # every token after the first, exactly once
    else:  # independent chunks: each chunk's first token is context only
        assert sorted(scored) == [t for t in range(1, n) if t % window != 0]


def test_perplexity_equals_a_direct_computation():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 50))
    res = perplexity(params, ids, cfg, window=64, stride=64)
    logp = jax.nn.log_softmax(llama.forward(params, jnp.asarray([ids]), cfg)[0], -1)
    nll = -np.mean([float(logp[t, ids[t + 1]]) for t in range(len(ids) - 1)])
    assert res.tokens_scored == 49 and res.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    strided = perplexity(params, ids, cfg, window=16, stride=8, batch=3)
    assert strided.tokens_scored == 49 and strided.windows == len(windows(50, 16, 8))
    assert res.compression_ratio == 1.0


def test_dmc_attention_reports_its_compression():
    cfg = tiny_config(num_layers=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    params["layers"]["k"] = params["layers"]["k"].at[..., -1].multiply(3.0)
    ids = list(np.random.default_rng(1).integers(0, cfg.vocab_size, 40))
    res = perplexity(params, ids, cfg, window=40, stride=40,
                     attention=DMCAttention(DMCConfig(mode="hard", decision_offset=0.0)))
    cr = np.asarray(res.compression_ratio_layer_head)
    assert cr.shape == (2, cfg.num_kv_heads) and (cr > 1.2).all() and 1.2 < res.compression_ratio < 4


def test_bad_windows_are_user_errors():
    with pytest.raises(UserError, match="eval.stride"):
        windows(10, 4, 5)
    with pytest.raises(UserError, match="eval.window"):
        windows(10, 1, 1)
