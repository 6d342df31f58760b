"""dms_tova: a DMS model's learned marks evicted lazily by the current query's attention, within a fixed budget.

Against a plain-numpy simulation of the rule (per sequence and KV head: kept positions, marks from the decision
channel, attention in float64 over the kept set, the tiers, prefill and decode), with GQA and a ragged batch; with
a budget that never fills, the DMS model with nothing evicted; the compare grid and the model directory's family.
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from dmc_jax.cache import model_method, registry
from dmc_jax.cache.dms_tova import DMSTOVACache
from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import DMSConfig, default_section
from dmc_jax.dms.decisions import read_decision, zero_decision_heads
from dmc_jax.errors import UserError
from dmc_jax.evaluation import compare_grid
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params
from tests.jitted import prefill_then_decode

B, T, N = 3, 12, 8           # sequences, padded prompt length, decode steps
CFG = tiny_config(head_dim=8)  # GQA: 4 query heads on 2 KV heads
H, K, DH = CFG.num_heads, CFG.num_kv_heads, CFG.head_dim
G = H // K
LAYER = 1                    # the cache writes layer 1 of a 2-layer state


def _dms(window):
    return DMSConfig(window=window, decision_scale=1.0, decision_offset=0.0, mode="hard")


class Reference:
    """The rule on one sequence, per KV head, in float64: kept positions and their marks."""

    def __init__(self, C, window, marks_TK):
        self.C, self.w, self.marks = C, window, marks_TK  # marks_TK[t, k]: token t's decision marks t - 1
        self.ambiguous = False

    def _tier(self, k, j, t):
        marked = j + 1 <= t and self.marks[j + 1, k]  # marked once the next token's decision has been read
        return 0 if marked and j <= t - 1 - self.w else (1 if marked else 2)

    def _order(self, score, k, t, best_first):
        """Candidates by (tier, score, position), flagging scores within rounding of each other in one tier."""
        key = lambda j: (self._tier(k, j, t), score[j], -j if best_first else j)
        order = sorted(score, key=key, reverse=best_first)
        for a, b in zip(order, order[1:]):
            if self._tier(k, a, t) == self._tier(k, b, t) and a != b and abs(score[a] - score[b]) <= 1e-5:
                self.ambiguous = True
        return order

    def prefill(self, A_KTT, n0):  # A_KTT[k]: group-mean causal attention of the prompt
        self.kept = [set(self._order({j: A_KTT[k][n0 - 1, j] for j in range(n0)}, k, n0 - 1, True)[:self.C])
                     for k in range(K)]
        return self.kept

    def decode(self, g_K, cands_K, p_new):  # g_K[k]: the new query's group-mean attention over cands_K[k]
        for k in range(K):
            self.kept[k].add(p_new)
            if len(self.kept[k]) > self.C:
                score = dict(zip(cands_K[k], g_K[k]))
                self.kept[k].remove(self._order(score, k, p_new, False)[0])
        return self.kept


def _probs(q_GD, k_ND):
    s = q_GD @ k_ND.T / math.sqrt(DH)
    s = np.exp(s - s.max(-1, keepdims=True))
    return s / s.sum(-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def _jitted(method):
    rope = Rope(CFG)
    prefill = jax.jit(lambda s, q, k, v, lengths: method.prefill(s, jnp.int32(LAYER), q, k, v, lengths, rope))
    decode = jax.jit(lambda s, q, k, v, pos: method.decode(s, jnp.int32(LAYER), q, k, v, pos, rope))
    return prefill, decode


def _kept_sets(state):
    pos, valid = np.asarray(state["pos"][LAYER]), np.asarray(state["valid"][LAYER])
    return [[set(pos[b, k][valid[b, k]].tolist()) for k in range(K)] for b in range(B)]


@pytest.mark.parametrize("budget, window", [(5, 0), (6, 2), (9, 3)])
@settings(max_examples=5, deadline=None)
@given(lengths=st.lists(st.integers(1, T), min_size=B, max_size=B), seed=st.integers(0, 2**16),
       threshold=st.sampled_from([0.0, -1.0]))
def test_rule_matches_numpy_reference(budget, window, lengths, seed, threshold):
    method = DMSTOVACache(_dms(window), budget=budget, threshold=threshold)
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    q_all = 2.0 * jax.random.normal(keys[0], (B, T + N, H, DH))
    k_all = jax.random.normal(keys[1], (B, T + N, K, DH))
    v_all = jax.random.normal(keys[2], (B, T + N, K, DH))
    a_BTK, qz = read_decision(q_all, K, _dms(window))
    marks_BTK = np.asarray(a_BTK - threshold > 0)
    positions = jnp.broadcast_to(jnp.arange(T + N), (B, T + N))
    rope = Rope(CFG)
    rq = np.asarray(zero_decision_heads(rope(qz, positions), K, DH - 1), np.float64)
    rk, rv = np.asarray(rope(k_all, positions), np.float64), np.asarray(v_all, np.float64)
    lengths_B = jnp.asarray(lengths, jnp.int32)

    state = method.init(CFG.replace(num_layers=2), B, T + N)
    assert state["k"].shape[3] == budget
    prefill, decode = _jitted(method)
    out_BTHD, state = prefill(state, q_all[:, :T], k_all[:, :T], v_all[:, :T], lengths_B)
    refs, got, want, outs = [], [_kept_sets(state)], [], []
    for b, n0 in enumerate(lengths):
        A = np.zeros((K, n0, n0))
        for i in range(n0):
            for k in range(K):
                probs_GN = _probs(rq[b, i, k * G:(k + 1) * G], rk[b, :i + 1, k])
                A[k, i, :i + 1] = probs_GN.mean(0)
                outs.append((out_BTHD[b, i, k * G:(k + 1) * G], probs_GN @ rv[b, :i + 1, k]))  # dense prefill
        refs.append(Reference(budget, window, marks_BTK[b]))
        refs[-1].prefill(A, n0)
    want.append([[set(s) for s in r.kept] for r in refs])
    for step in range(N):
        positions_B = lengths_B + step
        batch = jnp.arange(B)
        out_BHD, state = decode(state, q_all[batch, positions_B], k_all[batch, positions_B],
                                v_all[batch, positions_B], positions_B)
        for b, ref in enumerate(refs):
            p_new = int(positions_B[b])
            cands = [sorted(ref.kept[k]) + [p_new] for k in range(K)]
            g = []
            for k in range(K):
                probs_GN = _probs(rq[b, p_new, k * G:(k + 1) * G], rk[b, cands[k], k])
                outs.append((out_BHD[b, k * G:(k + 1) * G], probs_GN @ rv[b, cands[k], k]))
                g.append(probs_GN.mean(0))
            ref.decode(g, cands, p_new)
        got.append(_kept_sets(state))
        want.append([[set(s) for s in r.kept] for r in refs])
    assume(not any(r.ambiguous for r in refs))
    for got_HD, want_HD in outs:  # every query attends to exactly the kept tokens (marked ones until they go)
        np.testing.assert_allclose(got_HD, want_HD, atol=2e-5)
    for step, (g_sets, w_sets) in enumerate(zip(got, want)):
        assert g_sets == w_sets, f"step {step}: got {g_sets}, want {w_sets}"
    # Stored keys are the rotated keys of the positions they record; marks are the decisions'.
    pos, valid = np.asarray(state["pos"][LAYER]), np.asarray(state["valid"][LAYER])
    b, k, c = np.nonzero(valid)
    np.testing.assert_allclose(np.asarray(state["k"][LAYER])[b, k, c], rk[b, pos[b, k, c], k], atol=1e-5)
    last_B = np.asarray(lengths_B) + N - 1
    want_marked = (pos[b, k, c] < last_B[b]) & marks_BTK[b, np.minimum(pos[b, k, c] + 1, T + N - 1), k]
    np.testing.assert_array_equal(np.asarray(state["marked"][LAYER])[b, k, c], want_marked)


def _model(seed=0):
    cfg = tiny_config(num_kv_heads=2, num_heads=4, max_seq_len=64)
    return cfg, init_params(cfg, jax.random.PRNGKey(seed))


def test_a_budget_that_never_fills_is_the_dms_model_with_nothing_evicted():
    cfg, params = _model()
    dms = _dms(2)
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 20), 0, cfg.vocab_size)
    keep_BTV = np.asarray(llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(dms.replace(mode="keep")))[0])
    got, state = prefill_then_decode(params, cfg, DMSTOVACache(dms, budget=20), tokens_BT, 8)
    np.testing.assert_allclose(got, keep_BTV[:, 7:], atol=2e-4, rtol=2e-4)
    assert np.asarray(state["marked"]).any() and np.asarray(state["valid"]).all()  # marked, and still kept
    # DMS itself evicts the marked tokens after the window: other logits (so the test can fail).
    hard_BTV = np.asarray(llama.forward_aux(params, tokens_BT, cfg, attention=DMSAttention(dms))[0])
    assert np.max(np.abs(hard_BTV[:, 7:] - keep_BTV[:, 7:])) > 1e-2


def test_bytes_follow_the_budget_and_what_the_model_keeps_past_it_is_counted():
    cfg, params = _model()
    tokens_BT = jax.random.randint(jax.random.PRNGKey(2), (2, 24), 0, cfg.vocab_size)
    never = DMSConfig(window=2, decision_offset=1e6, mode="hard")  # nothing is ever marked
    _, state = prefill_then_decode(params, cfg, DMSTOVACache(never, budget=6), tokens_BT, 10)
    stats = DMSTOVACache(never, budget=6).stats(state, jnp.array([24, 24]))
    assert stats["capacity"] == 6 and float(stats["compression_ratio"]) == 4.0
    # every token past the budget was one the model wanted kept: 4 at prefill, then one per decode step
    np.testing.assert_array_equal(np.asarray(stats["overflow_LBK"]), 18)
    always = DMSConfig(window=2, decision_offset=-1e6, mode="hard")  # everything is marked: nothing forced
    _, state = prefill_then_decode(params, cfg, DMSTOVACache(always, budget=6), tokens_BT, 10)
    assert not np.asarray(state["overflow"]).any()


def test_the_compare_grid_gives_one_row_per_ratio_at_the_budget():
    rows = compare_grid.extra_rows("m", "dms_tova", (4.0, 8.0), 8.0)
    assert [r.ratio for r in rows] == [4.0, 8.0]
    assert compare_grid.budget("dms_tova", 8.0, 2048) == 256
    section = default_section()
    method = compare_grid.method_factory(registry.default_config(), "dms_tova", 8.0, section)(2048)
    assert isinstance(method, DMSTOVACache) and method.budget == 256 and method.dms.window == section.window
    assert [r.ratio for r in compare_grid.extra_rows("m", "dms_paged", (4.0, 8.0), 8.0)] == [8.0]


def _saved(tmp_path, method):
    cfg, params = _model()
    section = default_section() if method == "dms" else registry.trained_defaults("dmc")
    path = str(tmp_path / method)
    model_method.save(path, cfg, jax.tree.map(np.asarray, params), None, method if method == "dms" else "dmc_paged",
                      section)
    return path


def test_a_dms_model_takes_it_as_its_own_family_and_a_dmc_model_is_refused(tmp_path):
    config = ml_collections.ConfigDict({"model": {"source": _saved(tmp_path, "dms")},
                                        "cache": registry.default_config()})
    resolved = model_method.resolve(config, "dms_tova")
    assert resolved.wrap is None and resolved.from_model
    assert isinstance(resolved.make(budget=8), DMSTOVACache)
    config.model.source = _saved(tmp_path, "dmc")
    with pytest.raises(UserError, match="trained for dmc; cache method 'dms_tova' needs a model trained for dms"):
        model_method.resolve(config, "dms_tova")


@pytest.mark.parametrize("field, value, needle", [("threshold", float("nan"), "cache.dms_tova.threshold"),
                                                  ("budget", 0, "cache.budget must be >= 1")])
def test_bad_fields_are_user_errors(field, value, needle):
    with pytest.raises(UserError, match=needle):
        DMSTOVACache(_dms(2), **{field: value})
