"""DMC paged cache: the padded cache's outputs; pages allocated, freed and reused; pool exhaustion; bytes at CR 4."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.dmc_padded import DMCPaddedCache
from dmc_jax.cache.dmc_paged import DMCPagedCache, free_sequences, put_rows, take_rows
from dmc_jax.cache.paged_attention import (bucket_widths, paged_decode_attention,
                                           paged_decode_attention_bucketed)
from dmc_jax.cache.protocol import state_bytes
from dmc_jax.cache.registry import make_method
from dmc_jax.config_schema import validate
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.dmc.objective import default_config as dmc_default_config
from dmc_jax.errors import UserError
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.model import llama
from dmc_jax.model.attention import decode_attention
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params

prefill = jax.jit(llama.prefill, static_argnames=("method", "cfg"))
decode_step = jax.jit(llama.decode_step, static_argnames=("method", "cfg"))


def _model(kv_heads=2, decision_scale=1.0, seed=0):
    cfg = tiny_config(num_kv_heads=kv_heads)
    params = init_params(cfg, jax.random.PRNGKey(seed))
    # Decision logits a = k[ch] - c with c = 0: random signs give a mix of appends and merges.
    params["layers"]["k"] = params["layers"]["k"].at[..., -1].multiply(decision_scale)
    return cfg, params


def _prompt(tokens_BT, lengths_B):
    return jnp.where(jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None], tokens_BT, 0)


def _cached_logits(cfg, params, method, tokens_BT, lengths_B, steps, state=None):
    """Prefill prompts of lengths_B, then feed tokens_BT[b, lengths_B[b] + i]; logits after every token."""
    if state is None:
        state = method.init(cfg, tokens_BT.shape[0], int(lengths_B.max()) + steps)
    logits_BV, state = prefill(params, _prompt(tokens_BT, lengths_B), lengths_B, state, method=method, cfg=cfg)
    out, batch = [logits_BV], jnp.arange(tokens_BT.shape[0])
    for i in range(steps):
        pos_B = lengths_B + i
        logits_BV, state = decode_step(params, tokens_BT[batch, pos_B], pos_B, state, method=method, cfg=cfg)
        out.append(logits_BV)
    return out, state


# ------------------------------------------------------------------------------------------ same as padded
@settings(max_examples=5, deadline=None)
@given(kv_heads=st.sampled_from([1, 2, 4]), window=st.sampled_from([None, 1, 3, 12]),
       scale=st.sampled_from([0.5, 3.0]), lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3),
       page_size=st.sampled_from([1, 2, 4, 16]), growth=st.sampled_from([0.0, 1.5, 2 ** 0.5]),
       seed=st.integers(0, 1000))
def test_paged_equals_padded(kv_heads, window, scale, lengths, page_size, growth, seed):
    cfg, params = _model(kv_heads=kv_heads, decision_scale=scale, seed=seed)
    dmc = DMCConfig(window=window, decision_offset=0.0)
    steps = 6
    tokens_BT = jax.random.randint(jax.random.PRNGKey(seed + 1), (len(lengths), max(lengths) + steps), 0,
                                   cfg.vocab_size)
    lengths_B = jnp.asarray(lengths, jnp.int32)
    padded, state_a = _cached_logits(cfg, params, DMCPaddedCache(dmc), tokens_BT, lengths_B, steps)
    method = DMCPagedCache(dmc, page_size=page_size, attend_growth=growth)
    paged, state_b = _cached_logits(cfg, params, method, tokens_BT, lengths_B, steps)
    for a, b in zip(padded, paged):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(state_b["count"], state_a["count"])
    # every head holds exactly the pages its slots fill, and the pool accounts for all of them
    held_LBK = np.sum(np.asarray(state_b["table"]) >= 0, axis=-1)
    np.testing.assert_array_equal(held_LBK, -(-np.asarray(state_b["count"]) // page_size))
    assert int(state_b["top"]) + held_LBK.sum() == state_b["pool_k"].shape[0]
    method.check(state_b)


# --------------------------------------------------------------------------------------- attention reference
@settings(max_examples=8, deadline=None)
@given(B=st.integers(1, 3), K=st.integers(1, 3), G=st.integers(1, 3), N=st.sampled_from([1, 4, 16]),
       M=st.integers(1, 9), seed=st.integers(0, 1000))
def test_paged_attention_equals_decode_attention_on_a_gathered_layout(B, K, G, N, M, seed):
    rng = np.random.default_rng(seed)
    Dh, P = 8, B * K * M + 3
    pool_k, pool_v = (rng.normal(size=(P, N, Dh)).astype(np.float32) for _ in range(2))
    count_BK = rng.integers(1, M * N + 1, size=(B, K)).astype(np.int32)
    table_BKM = rng.permutation(P)[:B * K * M].reshape(B, K, M).astype(np.int32)
    table_BKM[np.arange(M)[None, None] * N >= count_BK[..., None]] = -1  # pages past the count: unallocated
    dense_k, dense_v = np.zeros((B, K, M * N, Dh), np.float32), np.zeros((B, K, M * N, Dh), np.float32)
    for b in range(B):
        for k in range(K):
            for s in range(count_BK[b, k]):
                page = table_BKM[b, k, s // N]
                dense_k[b, k, s], dense_v[b, k, s] = pool_k[page, s % N], pool_v[page, s % N]
    q_BHD = jnp.asarray(rng.normal(size=(B, K * G, Dh)), jnp.float32)
    valid_BKS = np.arange(M * N)[None, None] < count_BK[..., None]
    want = decode_attention(q_BHD, jnp.asarray(dense_k), jnp.asarray(dense_v), jnp.asarray(valid_BKS))
    args = (q_BHD, jnp.asarray(pool_k), jnp.asarray(pool_v), jnp.asarray(table_BKM), jnp.asarray(count_BK))
    np.testing.assert_allclose(paged_decode_attention(*args), want, atol=1e-5, rtol=1e-5)
    for growth in (1.5, 2.0):
        np.testing.assert_allclose(jax.jit(paged_decode_attention_bucketed, static_argnums=5)(*args, growth), want,
                                   atol=1e-5, rtol=1e-5)


def test_bucket_widths():
    assert bucket_widths(257, 16, 2.0) == (257, 129, 65, 33, 17, 9, 5, 3)
    assert bucket_widths(10, 16, 1.5) == (10, 7, 5, 4)
    assert bucket_widths(8, 16, 2.0) == (8, 4)
    assert bucket_widths(5, 1, 2.0) == (5,)


# ------------------------------------------------------------------------------------------ serving: free, reuse
def _serve(cfg, params, method, tokens_BT, lengths_B, new_tokens_T, new_length, steps, check=True):
    """Rows 0 and 1 prefill and decode `steps` tokens; row 0 finishes, is freed and gets a new prompt; both rows
    decode `steps` more. Returns per-row logits, pages in use after every step, free pages after the free."""
    max_tokens = tokens_BT.shape[1]
    state = method.init(cfg, 2, max_tokens)
    logits_BV, state = prefill(params, _prompt(tokens_BT, lengths_B), lengths_B, state, method=method, cfg=cfg)
    P = state["pool_k"].shape[0]
    rows, used = {0: [logits_BV[0]], 1: [logits_BV[1]], "new": []}, [P - int(state["top"])]
    pos_B, seqs = lengths_B, tokens_BT
    for phase in range(2):
        for _ in range(steps):
            logits_BV, state = decode_step(params, seqs[jnp.arange(2), pos_B], pos_B, state, method=method, cfg=cfg)
            rows[0 if phase == 0 else "new"].append(logits_BV[0])
            rows[1].append(logits_BV[1])
            used.append(P - int(state["top"]))
            pos_B = pos_B + 1
        if phase == 0:  # row 0 is done: its pages go back to the pool, a new prompt is prefilled into the row
            if check:
                method.check(state)
            held = int(np.sum(np.asarray(state["table"][:, 0]) >= 0))
            top = int(state["top"])
            state = jax.jit(free_sequences)(state, jnp.array([True, False]))
            assert int(state["top"]) == top + held and int(np.sum(np.asarray(state["table"][:, 0]) >= 0)) == 0
            rows_R = jnp.array([0])
            sub = take_rows(state, rows_R)
            new_BT = _prompt(new_tokens_T[None], jnp.array([new_length]))
            logits_RV, sub = prefill(params, new_BT, jnp.array([new_length]), sub, method=method, cfg=cfg)
            state = put_rows(state, sub, rows_R)
            rows["new"].append(logits_RV[0])
            used.append(P - int(state["top"]))
            seqs = jnp.stack([new_tokens_T, tokens_BT[1]])
            pos_B = pos_B.at[0].set(new_length)
    return rows, used, state


def test_finished_sequences_free_their_pages_for_new_prompts():
    cfg, params = _model(decision_scale=2.0)
    dmc = DMCConfig(window=3, decision_offset=0.0)
    steps, T = 5, 24
    tokens_BT = jax.random.randint(jax.random.PRNGKey(3), (3, T), 0, cfg.vocab_size)
    lengths_B, new_length = jnp.array([12, 9]), 11
    big = DMCPagedCache(dmc, page_size=2)  # the no-compression worst case: never runs out
    rows_big, used_big, _ = _serve(cfg, params, big, tokens_BT[:2], lengths_B, tokens_BT[2], new_length, steps)
    # A pool of exactly the peak: it fills up, and only the freed pages let the new prompt in.
    exact = DMCPagedCache(dmc, page_size=2, pages=max(used_big))
    rows, used, state = _serve(cfg, params, exact, tokens_BT[:2], lengths_B, tokens_BT[2], new_length, steps)
    assert used == used_big and max(used) == state["pool_k"].shape[0]
    exact.check(state)
    assert int(np.asarray(state["refused"]).sum()) == 0
    end_of_first_phase = used[steps]
    new_row_pages = int(np.sum(np.asarray(state["table"][:, 0]) >= 0))
    assert end_of_first_phase + new_row_pages > max(used)  # without freeing, the new prompt would not fit
    # every sequence gives the logits of a fresh run of its own
    for name, toks, length in ((0, tokens_BT[0], 12), (1, tokens_BT[1], 9), ("new", tokens_BT[2], new_length)):
        n = len(rows[name]) - 1
        fresh, _ = _cached_logits(cfg, params, big, toks[None], jnp.array([length]), n)
        for got, want in zip(rows[name], fresh):
            np.testing.assert_allclose(got, want[0], atol=1e-5, rtol=1e-5)
    # the same scenario one page short: the pool refuses a page, and check says so
    short = DMCPagedCache(dmc, page_size=2, pages=max(used_big) - 1)
    _, _, state = _serve(cfg, params, short, tokens_BT[:2], lengths_B, tokens_BT[2], new_length, steps, check=False)
    assert int(np.asarray(state["refused"]).sum()) > 0
    with pytest.raises(UserError, match="DMC paged cache"):
        short.check(state)


# ------------------------------------------------------------------------------------------------ exhaustion
def test_pool_exhaustion_is_an_error_naming_layer_and_head_or_merges():
    cfg, params = _model(decision_scale=0.0)  # a = 0 - 0: never > 0, every token appends
    dmc = DMCConfig(decision_offset=0.0)
    prompt = [list(range(1, 6))]  # 5 tokens: 3 pages of 2 slots per head, 12 pages for 2 layers x 2 KV heads
    gen = GenerateConfig(max_new_tokens=8)
    run = lambda method: generate(params, prompt, cfg, method, gen, jax.random.PRNGKey(0))
    with pytest.raises(UserError, match=r"overflow: layer 0, KV head 0 \(sequence 0\).*cache\.dmc_paged\.pages"):
        run(DMCPagedCache(dmc, page_size=2, pages=12))
    with pytest.raises(UserError, match=r"new sequence: layer 1, KV head 1 \(sequence 0\) lost 3 slots"):
        run(DMCPagedCache(dmc, page_size=2, pages=10))
    # 'merge': a head with no page left merges into its last slot, exactly as a full padded buffer of 6 does
    out = run(DMCPagedCache(dmc, page_size=2, pages=12, on_overflow="merge"))
    padded = run(DMCPaddedCache(dmc, capacity=6, on_overflow="merge"))
    assert out.tokens == padded.tokens
    np.testing.assert_array_equal(out.state["count"], padded.state["count"])
    assert int(out.state["refused"][0]) > 0 and int(out.state["overflow"].sum()) > 0
    for bad in (dict(on_overflow="drop"), dict(page_size=0), dict(attend_growth=1.0), dict(kernels="cuda")):
        with pytest.raises(UserError, match="cache."):
            DMCPagedCache(dmc, **bad)


def test_pallas_kernel_path_equals_xla():
    cfg, params = _model(decision_scale=2.0)
    dmc = DMCConfig(window=3, decision_offset=0.0)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, cfg.vocab_size)
    lengths_B = jnp.array([7, 4])
    xla, _ = _cached_logits(cfg, params, DMCPagedCache(dmc, page_size=4, kernels="xla"), tokens_BT, lengths_B, 3)
    pallas, _ = _cached_logits(cfg, params, DMCPagedCache(dmc, page_size=4, kernels="pallas"), tokens_BT,
                               lengths_B, 3)
    for a, b in zip(xla, pallas):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------------------------------- bytes
def test_bytes_allocated_at_cr_4_are_under_0_3_of_dense():
    cfg = tiny_config()
    B, T, steps = 2, 1024, 8
    L, H, K, Dh = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dmc = DMCConfig(decision_offset=0.0)  # the reference window of 12
    method = DMCPagedCache(dmc, page_size=16, target_cr=4, margin=1.0)
    state = method.init(cfg, B, T + steps)
    # Decisions forced on the key's decision channel: 3 tokens of every 4 merge (CR 4).
    force = lambda k_BTKD, t_T: k_BTKD.at[..., -1].set(jnp.where(t_T % 4 == 0, -1.0, 1.0)[None, :, None])
    q_BTHD, k_BTKD, v_BTKD = (jax.random.normal(jax.random.PRNGKey(i), (B, T + steps, n, Dh))
                              for i, n in enumerate((H, K, K)))
    k_BTKD = force(k_BTKD, jnp.arange(T + steps))
    rope, lengths_B = Rope(cfg), jnp.full((B,), T)
    step = jax.jit(method.decode, static_argnums=6)
    for layer in range(L):
        _, state = jax.jit(method.prefill, static_argnums=6)(state, jnp.int32(layer), q_BTHD[:, :T], k_BTKD[:, :T],
                                                            v_BTKD[:, :T], lengths_B, rope)
    for t in range(T, T + steps):
        for layer in range(L):
            _, state = step(state, jnp.int32(layer), q_BTHD[:, t], k_BTKD[:, t], v_BTKD[:, t], jnp.full((B,), t),
                            rope)
    method.check(state)
    stats = method.stats(state, jnp.full((B,), T + steps))
    measured_cr = (T + steps) / float(np.mean(stats["kept_LBK"]))
    assert measured_cr == 4.0
    dense_bytes = state_bytes(DenseCache().init(cfg, B, T + steps))
    assert stats["bytes_allocated"] == state_bytes(state)
    assert stats["bytes_allocated"] <= 0.3 * dense_bytes, stats["bytes_allocated"] / dense_bytes
    assert int(stats["bytes_in_use"]) <= stats["bytes_pool"]


# ---------------------------------------------------------------------------------------------------- config
def test_registry_builds_dmc_caches_from_the_config():
    from configs.smollm2 import get_config
    config = get_config()
    for name, cls in (("dmc", DMCPaddedCache), ("dmc_paged", DMCPagedCache)):
        config.cache.method = name
        validate(config)
        assert isinstance(make_method(config.cache), cls)
        config.dmc = dmc_default_config()
        config.dmc.window = 0
        config.dmc.decision_offset = 2.0
        method = make_method(config.cache, config.get("dmc"))
        assert method.dmc.window is None and method.dmc.decision_offset == 2.0
        del config["dmc"]
    config.cache.dmc_paged.page_size = 0
    with pytest.raises(UserError, match=r"cache\.dmc_paged\.page_size"):
        validate(config)
    # A section of only the method's name builds it with every field at its default.
    assert make_method(ml_collections.ConfigDict({"method": "dmc_paged"})).page_size == 16
    # A flat section of a config written before the per-method sections still sizes the cache.
    old = ml_collections.ConfigDict({"method": "dmc_paged", "page_size": 32, "target_cr": 4.0})
    assert (make_method(old).page_size, make_method(old).target_cr) == (32, 4.0)
