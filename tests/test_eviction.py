"""Eviction policies (StreamingLLM, H2O, TOVA, SnapKV, CORM) against plain-numpy references of their rules.

The references simulate each rule directly: per sequence and KV head, a set of kept positions, attention in
float64 over that set, the rule applied step by step through prefill and decoding. The policies run on random
q/k/v with GQA and a ragged batch; kept sets, stored keys (after RoPE) and attention outputs must match.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from dmc_jax.cache.corm import CORMCache
from dmc_jax.cache.dense import DenseCache
from dmc_jax.cache.h2o import H2OCache
from dmc_jax.cache.protocol import state_bytes
from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import registry
from dmc_jax.cache.registry import make_method
from dmc_jax.cache.snapkv import SnapKVCache
from dmc_jax.cache.streaming_llm import StreamingLLMCache
from dmc_jax.cache.tova import TOVACache
from dmc_jax.config_schema import validate
from dmc_jax.errors import UserError
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params

B, T, N = 3, 12, 8           # sequences, padded prompt length, decode steps
CFG = tiny_config(head_dim=8)  # GQA: 4 query heads on 2 KV heads
H, K, DH = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
G = H // K
LAYER = 1                    # the policies write layer 1 of a 2-layer state; layer 0 must stay empty

POLICIES = [
    StreamingLLMCache(budget=6, n_sink=2),
    H2OCache(budget=6),
    H2OCache(budget=7, recent_ratio=0.3),
    TOVACache(budget=6),
    TOVACache(budget=6, per_head=True),
    SnapKVCache(budget=7, window=3, kernel=3),
    SnapKVCache(budget=6, window=2, kernel=5, decode_evict="oldest"),
    CORMCache(window=2, recent=3),
    CORMCache(budget=6, window=2, recent=3, alpha=1.5),
]


# ------------------------------------------------------------------------------------------ numpy references


class Reference:
    """One policy's rule on one sequence, per KV head: kept positions and per-token statistics."""

    def __init__(self, policy, capacity):
        self.p, self.C = policy, capacity
        self.ambiguous = False  # a decision within rounding of a tie: the example is skipped

    def _close(self, a, b):
        # fp32 attention probabilities carry ~1e-6 relative error at any magnitude (so do sums of them). Exact
        # ties are structural and computed exactly by both sides (SnapKV's pooling of a short prefix, one key
        # seen with probability 1); both break them towards the earlier position.
        if np.isfinite(a) and np.isfinite(b) and a != b and abs(a - b) <= 1e-5 * max(abs(a), abs(b)):
            self.ambiguous = True

    def top(self, score, n):
        """The n best positions by score (ties: earlier position), flagging a near-tie at the boundary."""
        order = sorted(score, key=lambda j: (-score[j], j))
        if 0 < n < len(order):
            self._close(score[order[n - 1]], score[order[n]])
        return set(order[:max(n, 0)])

    def argmin(self, score):
        order = sorted(score, key=lambda j: (score[j], j))
        if len(order) > 1:
            self._close(score[order[0]], score[order[1]])
        return order[0]

    def below(self, value, threshold):
        self._close(value, threshold)
        return value < threshold

    # A_k: [n0, n0] group-mean causal attention of the prompt (row = query, column = key), per KV head k.
    def prefill(self, A, n0):
        p, C = self.p, self.C
        self.stats = [dict() for _ in range(K)]
        if isinstance(p, TOVACache) and not p.per_head:
            A = [np.mean(A, axis=0)] * K
        kept = []
        for k in range(K):
            a, s = A[k], self.stats[k]
            everything = set(range(n0))
            if isinstance(p, StreamingLLMCache):
                keep = everything if n0 <= C else set(range(p.n_sink)) | set(range(n0 - (C - p.n_sink), n0))
            elif isinstance(p, H2OCache):
                s.update({j: a[:, j].sum() for j in range(n0)})
                recent = {j for j in everything if j >= n0 - p.recent}
                keep = recent | self.top({j: s[j] for j in everything - recent}, C - len(recent))
            elif isinstance(p, TOVACache):
                keep = self.top({j: a[n0 - 1, j] for j in everything}, C)
            elif isinstance(p, SnapKVCache):
                start = max(n0 - p.window, 0)
                obs = {j: a[start:, j].sum() for j in range(n0 - p.window)}
                half = p.kernel // 2
                pooled = {j: sum(obs.get(j + d, 0.0) for d in range(-half, half + 1)) / p.kernel for j in obs}
                window = everything - set(obs)
                s.update({j: math.inf for j in window})
                s.update(pooled)
                keep = window | self.top(pooled, C - len(window))
            elif isinstance(p, CORMCache):
                rows = range(max(n0 - p.window, 0), n0)
                survivors, old_score = set(), {}
                for j in everything:
                    run = 0
                    for i in reversed(rows):
                        if i < j or not self.below(a[i, j] * (i + 1), p.alpha):
                            break
                        run += 1
                    s[j] = {"run": run, "last": a[n0 - 1, j]}
                    old = j < n0 - p.recent
                    if old and run >= p.window:
                        continue
                    survivors.add(j)
                    if old:
                        old_score[j] = s[j]["last"] - run
                recent = survivors - set(old_score)
                keep = recent | self.top(old_score, C - len(recent)) if len(survivors) > C else survivors
            kept.append(keep)
        self.kept = kept
        return kept

    # g_k: group-mean attention of the new query over cands (sorted kept positions, then the new position p).
    def decode(self, g, cands, p_new):
        p, C = self.p, self.C
        if isinstance(p, TOVACache) and not p.per_head:
            assert all(c == cands[0] for c in cands)
            g = [np.mean(g, axis=0)] * K
        for k in range(K):
            keep, s, gk, ck = self.kept[k], self.stats[k], g[k], cands[k]
            score = dict(zip(ck, gk))
            keep.add(p_new)
            if isinstance(p, StreamingLLMCache):
                if len(keep) > C:
                    keep.remove(min(j for j in keep if j >= p.n_sink))
            elif isinstance(p, H2OCache):
                s[p_new] = 0.0
                for j in ck:
                    s[j] += score[j]
                if len(keep) > C:
                    victim = self.argmin({j: s[j] for j in keep if j <= p_new - p.recent})
                    keep.remove(victim)
            elif isinstance(p, TOVACache):
                if len(keep) > C:
                    keep.remove(self.argmin(score))
            elif isinstance(p, SnapKVCache):
                s[p_new] = math.inf
                if len(keep) > C:
                    old = [j for j in keep if j <= p_new - p.window]
                    scored = {j: s[j] for j in old if np.isfinite(s[j])}
                    keep.remove(self.argmin(scored) if scored and p.decode_evict == "score" else min(old))
            elif isinstance(p, CORMCache):
                s[p_new] = {"run": 0, "last": 0.0}
                n = len(ck)
                for j in ck:
                    below = self.below(score[j] * n, p.alpha)
                    s[j] = {"run": min(s[j]["run"] + 1, p.window) if below else 0, "last": score[j]}
                old = [j for j in ck if j <= p_new - p.recent]
                for j in old:
                    if s[j]["run"] >= p.window:
                        keep.remove(j)
                if len(keep) > C:
                    keep.remove(self.argmin({j: s[j]["last"] - s[j]["run"] for j in old if j in keep}))
        return self.kept


def _head_probs(q_GD, k_ND):
    """float64 softmax attention of G query heads over N keys: [G, N]."""
    s = q_GD @ k_ND.T / math.sqrt(DH)
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)


# ------------------------------------------------------------------------------------------------ harness


@functools.lru_cache(maxsize=None)
def _jitted(policy):
    rope = Rope(CFG)
    prefill = jax.jit(lambda s, layer, q, k, v, lengths: policy.prefill(s, layer, q, k, v, lengths, rope))
    decode = jax.jit(lambda s, layer, q, k, v, pos: policy.decode(s, layer, q, k, v, pos, rope))
    return prefill, decode


def _kept_sets(state, layer):
    pos, valid = np.asarray(state["pos"][layer]), np.asarray(state["valid"][layer])
    assert np.all((pos >= 0) == valid)
    return [[set(pos[b, k][valid[b, k]].tolist()) for k in range(K)] for b in range(pos.shape[0])]


def _check_buffer(state, rk, rv):
    """Every valid slot holds the rotated key and the value of the position it records."""
    pos, valid = np.asarray(state["pos"][LAYER]), np.asarray(state["valid"][LAYER])
    b, k, c = np.nonzero(valid)
    np.testing.assert_allclose(np.asarray(state["k"][LAYER])[b, k, c], rk[b, pos[b, k, c], k], atol=1e-6)
    np.testing.assert_allclose(np.asarray(state["v"][LAYER])[b, k, c], rv[b, pos[b, k, c], k], atol=1e-6)
    assert not np.any(np.asarray(state["valid"][0]))


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: repr(p))
@settings(max_examples=6, deadline=None)
@given(lengths=st.lists(st.integers(1, T), min_size=B, max_size=B), seed=st.integers(0, 2**16),
       sharpness=st.sampled_from([1.0, 3.0]))
def test_policy_matches_numpy_reference(policy, lengths, seed, sharpness):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q_all = sharpness * jax.random.normal(keys[0], (B, T + N, H, DH))
    k_all = jax.random.normal(keys[1], (B, T + N, K, DH))
    v_all = jax.random.normal(keys[2], (B, T + N, K, DH))
    positions = jnp.broadcast_to(jnp.arange(T + N), (B, T + N))
    rope = Rope(CFG)
    rq, rk = np.asarray(rope(q_all, positions), np.float64), np.asarray(rope(k_all, positions), np.float64)
    rv = np.asarray(v_all, np.float64)
    lengths_B = jnp.asarray(lengths, jnp.int32)

    state = policy.init(CFG.replace(num_layers=2), B, T + N)
    capacity = state["k"].shape[3]
    assert capacity == (policy.budget or T + N)
    prefill, decode = _jitted(policy)
    layer = jnp.int32(LAYER)
    out_BTHD, state = prefill(state, layer, q_all[:, :T], k_all[:, :T], v_all[:, :T], lengths_B)

    refs, got, want, outs = [], [], [], []
    for b, n0 in enumerate(lengths):
        # Prefill: full causal attention over the prompt, then the rule.
        A = np.zeros((K, n0, n0))
        for i in range(n0):
            for k in range(K):
                probs_GN = _head_probs(rq[b, i, k * G:(k + 1) * G], rk[b, :i + 1, k])
                A[k, i, :i + 1] = probs_GN.mean(0)
                np.testing.assert_allclose(out_BTHD[b, i, k * G:(k + 1) * G], probs_GN @ rv[b, :i + 1, k],
                                           atol=2e-5)
        ref = Reference(policy, capacity)
        ref.prefill(A, n0)
        refs.append(ref)
    got.append(_kept_sets(state, LAYER))
    want.append([[set(s) for s in r.kept] for r in refs])
    _check_buffer(state, rk, rv)

    for step in range(N):
        positions_B = lengths_B + step
        batch = jnp.arange(B)
        out_BHD, state = decode(state, layer, q_all[batch, positions_B], k_all[batch, positions_B],
                                v_all[batch, positions_B], positions_B)
        for b, ref in enumerate(refs):
            p_new = int(positions_B[b])
            cands = [sorted(ref.kept[k]) + [p_new] for k in range(K)]
            g = []
            for k in range(K):
                probs_GN = _head_probs(rq[b, p_new, k * G:(k + 1) * G], rk[b, cands[k], k])
                outs.append((out_BHD[b, k * G:(k + 1) * G], probs_GN @ rv[b, cands[k], k]))
                g.append(probs_GN.mean(0))
            ref.decode(g, cands, p_new)
        got.append(_kept_sets(state, LAYER))
        want.append([[set(s) for s in r.kept] for r in refs])
    _check_buffer(state, rk, rv)
    assume(not any(r.ambiguous for r in refs))  # else the two may break a tie differently, and part ways
    for got_HD, want_HD in outs:  # each query attends to exactly the kept tokens
        np.testing.assert_allclose(got_HD, want_HD, atol=2e-5)
    for step, (g_sets, w_sets) in enumerate(zip(got, want)):
        assert g_sets == w_sets, f"step {step}: got {g_sets}, want {w_sets}"
    stats = policy.stats(state, lengths_B + N)
    np.testing.assert_array_equal(stats["kept_LBK"][LAYER], [[len(s) for s in row] for row in want[-1]])


@pytest.mark.parametrize("chunk", [1, 5, 12, 256])
def test_column_sums_in_chunks_equal_the_whole_matrix(chunk):
    """H2O's accumulated prompt attention, chunk by chunk (chunks that do not divide T included) == float64."""
    keys = jax.random.split(jax.random.PRNGKey(chunk), 2)
    q_BTHD = 2.0 * jax.random.normal(keys[0], (B, T, H, DH))
    k_BTKD = jax.random.normal(keys[1], (B, T, K, DH))
    lengths = [T, 7, 1]
    got_BKT = np.asarray(ev.column_sums(q_BTHD, k_BTKD, jnp.asarray(lengths, jnp.int32), chunk=chunk))
    q, k = np.asarray(q_BTHD, np.float64), np.asarray(k_BTKD, np.float64)
    want_BKT = np.zeros((B, K, T))
    for b, n0 in enumerate(lengths):
        for i in range(n0):
            for kv in range(K):
                want_BKT[b, kv, :i + 1] += _head_probs(q[b, i, kv * G:(kv + 1) * G], k[b, :i + 1, kv]).mean(0)
    np.testing.assert_allclose(got_BKT, want_BKT, atol=1e-5)


# ---------------------------------------------------------------------------------------- with the model


@functools.partial(jax.jit, static_argnames=("method", "cfg", "steps", "max_tokens"))
def _logits_through(params, tokens_BT, lengths_B, method, cfg, steps, max_tokens):
    """Prefill, then feed the following tokens one by one (one compiled program); logits [steps + 1, B, V]."""
    state = method.init(cfg, tokens_BT.shape[0], max_tokens)
    T = tokens_BT.shape[1] - steps
    prompt_BT = jnp.where(jnp.arange(T)[None] < lengths_B[:, None], tokens_BT[:, :T], 0)
    logits_BV, state = llama.prefill(params, prompt_BT, lengths_B, state, method, cfg)
    batch = jnp.arange(tokens_BT.shape[0])

    def step(state, i):
        positions_B = lengths_B + i
        logits_BV, state = llama.decode_step(params, tokens_BT[batch, positions_B], positions_B, state, method, cfg)
        return state, logits_BV

    state, rest_NBV = jax.lax.scan(step, state, jnp.arange(steps))
    return jnp.concatenate([logits_BV[None], rest_NBV]), state


def test_budget_covering_the_sequence_equals_the_dense_cache_exactly():
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    T_prompt, steps = 8, 4
    S = T_prompt + steps
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, S), 0, cfg.vocab_size)
    lengths_B = jnp.array([7, 3], jnp.int32)
    run = functools.partial(_logits_through, params, tokens_BT, lengths_B, cfg=cfg, steps=steps,
                            max_tokens=S)
    dense, _ = run(method=DenseCache())
    # CORM's rule needs `window` (32) queries to judge a key, more than this sequence has.
    for method in (StreamingLLMCache(budget=S, n_sink=4), H2OCache(budget=S), TOVACache(budget=S),
                   SnapKVCache(budget=S, window=4), CORMCache(), CORMCache(budget=S, recent=4)):
        got, state = run(method=method)
        assert state["k"].shape[3] == S
        np.testing.assert_array_equal(got, dense, err_msg=str(method))


def _cache_config(method, **fields):
    """A cache section in the per-method layout; fields 'name.field' go to the method's own section."""
    c = ml_collections.ConfigDict(dict(method=method, budget=8, snapkv=dict(window=4), corm=dict(window=2, recent=4),
                                       corm_capped=dict(window=2, recent=4)))
    for key, value in fields.items():
        section, _, field = key.rpartition(".")
        if section and section not in c:
            c[section] = ml_collections.ConfigDict()
        (c[section] if section else c)[field] = value
    return c


def _legacy_cache_config(method, **fields):
    """The flat cache section of configs written before the per-method sections."""
    c = ml_collections.ConfigDict(dict(method=method, budget=8, n_sink=4, h2o_recent_ratio=0.5,
                                       tova_per_head=False, snapkv_window=4, snapkv_kernel=5,
                                       snapkv_decode_evict="score", corm_window=2, corm_recent=4, corm_alpha=1.0))
    c.update(fields)
    return c


# Every registered training-free eviction method (the registry is the only list).
METHODS = tuple(n for n in registry.names() if n != "dense" and registry.get(n).trained is None)


@pytest.mark.parametrize("name", METHODS)
def test_generate_runs_with_each_method(name):
    cfg = tiny_config()
    params = init_params(cfg, jax.random.PRNGKey(0))
    method = make_method(_cache_config(name))
    assert method.name == name
    prompts = [list(range(1, 21)), [5, 6, 7, 8, 9]]
    gen = GenerateConfig(max_new_tokens=6)
    out = generate(params, prompts, cfg, method, gen, jax.random.PRNGKey(2))
    assert [len(t) for t in out.tokens] == [6, 6]
    stats = method.stats(out.state, out.lengths)
    capacity = out.state["k"].shape[3]
    assert capacity == (64 + 6 if name == "corm" else 8)  # corm: adaptive within the largest buffer needed
    assert stats["bytes_allocated"] == state_bytes(out.state)
    kept = np.asarray(stats["kept_LBK"])
    assert np.all(kept <= capacity) and np.all(kept >= 1)
    assert float(stats["compression_ratio"]) > 1.0
    assert 0 < float(stats["bytes_in_use"]) <= stats["bytes_allocated"]


@pytest.mark.parametrize("policy", [StreamingLLMCache(budget=16), H2OCache(budget=16), TOVACache(budget=16),
                                    SnapKVCache(budget=16, window=4), CORMCache(budget=16, recent=8)])
def test_buffers_are_sized_by_the_budget_not_the_length(policy):
    cfg = tiny_config()
    state = policy.init(cfg, 2, 1000)
    assert state["k"].shape == (cfg.num_layers, 2, cfg.num_kv_heads, 16, cfg.head_dim)
    assert all(x.shape[:4] == state["k"].shape[:4] for x in state.values())
    assert state_bytes(state) < state_bytes(DenseCache().init(cfg, 2, 1000)) / 20


@pytest.mark.parametrize("build, field", [
    (lambda: StreamingLLMCache(budget=4, n_sink=4), "cache.streaming_llm.n_sink"),
    (lambda: H2OCache(budget=8, recent_ratio=1.5), "cache.h2o.recent_ratio"),
    (lambda: H2OCache(budget=0), "cache.budget"),
    (lambda: TOVACache(budget=0), "cache.budget"),
    (lambda: SnapKVCache(budget=32, window=32), "cache.snapkv.window"),
    (lambda: SnapKVCache(budget=64, kernel=4), "cache.snapkv.kernel"),
    (lambda: SnapKVCache(budget=64, decode_evict="newest"), "cache.snapkv.decode_evict"),
    (lambda: CORMCache(budget=16, recent=32), "cache.corm.recent"),
    (lambda: CORMCache(window=0), "cache.corm.window"),
    (lambda: CORMCache(alpha=-1.0), "cache.corm.alpha"),
])
def test_bad_fields_are_user_errors_naming_the_field(build, field):
    with pytest.raises(UserError, match=field.replace(".", r"\.")):
        build()


@pytest.mark.parametrize("name, fields, needle", [
    ("streaming_llm", dict(budget=3), "cache.budget (3) must exceed cache.streaming_llm.n_sink"),
    ("snapkv", dict(budget=4), "cache.snapkv.window"),
    ("corm_capped", dict(budget=4), "cache.corm.recent"),
    ("h2o", {"h2o.recent_ratio": -0.1}, "cache.h2o.recent_ratio"),
    ("h2o", {"h2o.recent": 3}, "cache.h2o has no field recent; its fields are recent_ratio"),
])
def test_config_validation_names_the_field(name, fields, needle):
    """(A config's cache.method names the method; its fields live in cache.<method>.)"""
    config = ml_collections.ConfigDict(dict(task="generate", model=dict(source="smollm2", param_dtype="float32",
                                                                          compute_dtype="float32", max_seq_len=0)))
    config.cache = _cache_config(name, **fields)
    with pytest.raises(UserError, match=needle.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        validate(config)


@pytest.mark.parametrize("name", METHODS)
def test_a_legacy_flat_cache_section_builds_the_same_method(name):
    """Configs written before the per-method sections (cache.h2o_recent_ratio, ...) keep working."""
    legacy = _legacy_cache_config(name, **({"h2o_recent_ratio": 0.25, "corm_alpha": 0.5}))
    new = _cache_config(name, **{"h2o.recent_ratio": 0.25, "corm.alpha": 0.5, "corm_capped.alpha": 0.5})
    assert make_method(legacy) == make_method(new)
    if name == "h2o":
        assert make_method(legacy).recent_ratio == 0.25
