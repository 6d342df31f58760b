"""The DMS caches' query-chosen prompt (cache.dms.prompt / cache.dms_paged.prompt = 'query'): the prompt attended
densely, each head keeping as many tokens as DMS would, its last w + 1 and the older ones the last prompt token
attends to most (the mean over the layer's query heads, TOVA's score); against a float64 numpy reference, and the padded and paged caches against each other."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.cache.dms import DMSCache, prefill_kept
from dmc_jax.cache.dms_paged import DMSPagedCache
from dmc_jax.dms.config import DMSConfig
from dmc_jax.dms.decisions import read_decision, zero_decision_heads
from dmc_jax.errors import UserError
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params
from tests.jitted import prefill_then_decode

CFG = tiny_config(head_dim=8)  # 4 query heads on 2 KV heads
H, K, DH = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
G = H // K


@pytest.mark.parametrize("window, seed", [(3, 0), (0, 1), (5, 2)])
def test_each_head_keeps_its_dms_share_chosen_by_the_last_query(window, seed):
    B, T, lengths = 2, 14, [14, 9]
    dms = DMSConfig(window=window, decision_scale=1.0, decision_offset=0.0, mode="hard")
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q = 2.0 * jax.random.normal(keys[0], (B, T, H, DH))
    k = jax.random.normal(keys[1], (B, T, K, DH))
    v = jax.random.normal(keys[2], (B, T, K, DH))
    lengths_B = jnp.asarray(lengths, jnp.int32)
    rope = Rope(CFG)
    _, marked_dms, kept_dms = prefill_kept(DMSCache(dms), q, k, v, lengths_B, rope)
    out, marked, kept = prefill_kept(DMSCache(dms, prompt="query"), q, k, v, lengths_B, rope)
    kept, kept_dms, marked = np.asarray(kept), np.asarray(kept_dms), np.asarray(marked)
    np.testing.assert_array_equal(kept.sum(-1), kept_dms.sum(-1))  # DMS's share of each head
    positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    _, qz = read_decision(q, K, dms)
    rq = np.asarray(zero_decision_heads(rope(qz, positions), K, DH - 1), np.float64)
    rk, rv = np.asarray(rope(k, positions), np.float64), np.asarray(v, np.float64)
    changed = 0
    for b, n in enumerate(lengths):
        last_HN = []
        for kh in range(K):
            s = rq[b, :n, kh * G:(kh + 1) * G] @ rk[b, :n, kh].T / math.sqrt(DH)  # [n rows, G heads, n keys]
            for i in range(n):  # dense causal attention of every prompt row
                p = np.exp(s[i, :, :i + 1] - s[i, :, :i + 1].max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                np.testing.assert_allclose(out[b, i, kh * G:(kh + 1) * G], p @ rv[b, :i + 1, kh], atol=2e-5)
            last_HN.extend(p)
        score = np.mean(last_HN, axis=0)  # the last row's attention, mean over the layer's query heads (TOVA)
        for kh in range(K):
            window_set = set(range(max(n - 1 - window, 0), n))
            older = sorted(set(range(n)) - window_set, key=lambda j: (-score[j], j))
            want = window_set | set(older[:int(kept_dms[b, kh].sum()) - len(window_set)])
            assert set(np.nonzero(kept[b, kh])[0].tolist()) == want
            assert not kept[b, kh, n:].any()
            changed += want != set(np.nonzero(kept_dms[b, kh])[0].tolist())
            # marks only inside the window (the older kept tokens are past it and stay)
            np.testing.assert_array_equal(marked[b, kh], np.asarray(marked_dms)[b, kh] & (np.arange(T) >= n - 1 - window)
                                          & (np.arange(T) < n))
    assert changed  # the query chose other tokens than DMS somewhere (so the test can fail)


def test_the_padded_and_paged_caches_serve_the_same_query_chosen_prompt():
    cfg = tiny_config(num_kv_heads=2, num_heads=4, max_seq_len=64)
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 26), 0, cfg.vocab_size)
    dms = DMSConfig(window=3, decision_scale=1.0, decision_offset=0.0, mode="hard")
    padded, s_pad = prefill_then_decode(params, cfg, DMSCache(dms, prompt="query"), tokens_BT, 18)
    paged, s_paged = prefill_then_decode(params, cfg, DMSPagedCache(dms, page_size=4, prompt="query"), tokens_BT, 18)
    np.testing.assert_allclose(paged, padded, atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(np.asarray(s_paged["count"]), (np.asarray(s_pad["pos"]) >= 0).sum(-1))
    own, _ = prefill_then_decode(params, cfg, DMSCache(dms), tokens_BT, 18)
    assert np.max(np.abs(own - padded)) > 1e-2  # DMS's own prompt is another cache


@pytest.mark.parametrize("cls, section", [(DMSCache, "cache.dms.prompt"), (DMSPagedCache, "cache.dms_paged.prompt")])
def test_an_unknown_prompt_rule_is_a_user_error(cls, section):
    with pytest.raises(UserError, match=section):
        cls(DMSConfig(window=2), prompt="question")
