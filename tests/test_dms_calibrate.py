"""dms/calibrate.py: the kept-token count it derives from decision logits is what the DMS cache keeps, and the
threshold it picks fills a target from below."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.cache.dms import DMSCache
from dmc_jax.dms import calibrate
from dmc_jax.dms.config import DMSConfig
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params


def _setup(window=3, T=40, rows=3):
    cfg = tiny_config(num_kv_heads=2, num_heads=4, max_seq_len=128)
    params = init_params(cfg, jax.random.PRNGKey(0))
    dms = DMSConfig(window=window, decision_scale=1.0, decision_offset=0.0)  # a random q channel: mixed decisions
    rows_NT = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (rows, T), 0, cfg.vocab_size), np.int32)
    return cfg, params, dms, rows_NT


def _cache_kept(cfg, params, dms, rows_NT, threshold):
    """[L, N, K] tokens the DMS cache (unbounded buffer) holds after prefilling the rows at `threshold`."""
    N, T = rows_NT.shape
    method = DMSCache(dms.replace(mode="hard"), threshold=threshold, capacity=T)
    state = method.init(cfg, N, T)
    lengths = jnp.full((N,), T, jnp.int32)
    _, state = llama.prefill(params, jnp.asarray(rows_NT), lengths, state, method, cfg)
    return np.asarray(method.stats(state, lengths)["kept_LBK"])


@pytest.mark.parametrize("threshold", [-0.3, 0.0, 0.4])
def test_kept_tokens_from_the_logits_equal_what_the_cache_keeps(threshold):
    cfg, params, dms, rows_NT = _setup()
    a_LNTK = calibrate.decision_logits(params, cfg, dms, rows_NT, threshold)
    counted = calibrate.kept_per_head(a_LNTK, dms.window)
    np.testing.assert_array_equal(counted, _cache_kept(cfg, params, dms, rows_NT, threshold))
    assert 0 < (counted < rows_NT.shape[1]).mean()  # something was evicted: the count is not trivially T


def test_calibrated_threshold_fills_the_target_from_below_and_bad_rows_are_user_errors():
    cfg, params, dms, rows_NT = _setup()
    at_zero = _cache_kept(cfg, params, dms, rows_NT, 0.0).mean()
    target = at_zero + 6.0  # room for more: the threshold must rise
    found = calibrate.calibrate(params, cfg, dms, rows_NT, target, rounds=3)
    assert found.threshold > 0 and found.kept_per_head <= target
    kept = _cache_kept(cfg, params, dms, rows_NT, found.threshold).mean()
    assert at_zero < kept <= target + 1.0  # deeper layers move a little with the threshold: within a token
    lower = calibrate.calibrate(params, cfg, dms, rows_NT, at_zero - 4.0)
    assert lower.threshold < 0 and _cache_kept(cfg, params, dms, rows_NT, lower.threshold).mean() < at_zero
    with pytest.raises(UserError, match="no serving threshold fits"):
        calibrate.calibrate(params, cfg, dms, rows_NT, dms.window)  # fewer than the window's w + 1
    with pytest.raises(UserError, match="more tokens than the window"):
        calibrate.calibrate(params, cfg, dms, rows_NT[:, :4], 3.0)
