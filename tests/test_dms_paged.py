"""DMS paged cache: DMSCache's outputs and kept tokens with an unbounded buffer; unbalanced heads share a pool sized
for the average CR; freed slots are reused and a head holds the pages its tokens fill; a freed row's pages go back;
an exhausted pool is an error (or counted); the bytes."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache import model_method, registry
from dmc_jax.cache.dms import DMSCache, capacity_for
from dmc_jax.cache.dms_paged import DMSPagedCache
from dmc_jax.cache.protocol import state_bytes
from dmc_jax.dms.config import DMSConfig
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params

_prefill = jax.jit(llama.prefill, static_argnames=("method", "cfg"))
_decode = jax.jit(llama.decode_step, static_argnames=("method", "cfg"))


def _dms(window, **kw):
    # scale 1, offset 0: the sign of a random q channel, so a mix of kept and marked tokens
    return DMSConfig(window=window, decision_scale=1.0, decision_offset=kw.get("offset", 0.0))


def _cached_logits(cfg, params, method, tokens_BT, lengths_B, steps):
    """Prefill prompts of lengths_B, then feed tokens_BT[b, lengths_B[b] + i]; logits after every token."""
    state = method.init(cfg, tokens_BT.shape[0], int(lengths_B.max()) + steps)
    prompt_BT = jnp.where(jnp.arange(tokens_BT.shape[1])[None] < lengths_B[:, None], tokens_BT, 0)
    logits_BV, state = _prefill(params, prompt_BT, lengths_B, state, method=method, cfg=cfg)
    out, batch = [logits_BV], jnp.arange(tokens_BT.shape[0])
    for i in range(steps):
        pos_B = lengths_B + i
        logits_BV, state = _decode(params, tokens_BT[batch, pos_B], pos_B, state, method=method, cfg=cfg)
        out.append(logits_BV)
    return out, state


def _held_positions(state):
    """[L][B][K] sorted positions of the tokens each head holds: its first `count` slots, through its block table."""
    table, pos, count = np.asarray(state["table"]), np.asarray(state["pool_pos"]), np.asarray(state["count"])
    N = pos.shape[1]
    L, B, K, _ = table.shape
    return [[[sorted(int(pos[table[l, b, k, s // N], s % N]) for s in range(count[l, b, k])) for k in range(K)]
             for b in range(B)] for l in range(L)]


def _check_accounting(state):
    """Every page is free or held by one head, and a head holds exactly the pages its kept tokens fill."""
    table, N = np.asarray(state["table"]), state["pool_pos"].shape[1]
    held = table[table >= 0]
    assert len(set(held.tolist())) == len(held) and int(state["top"]) + len(held) == state["pool_pos"].shape[0]
    assert not set(held.tolist()) & set(np.asarray(state["free"])[:int(state["top"])].tolist())
    held_LBKM = table >= 0
    np.testing.assert_array_equal(held_LBKM.sum(-1), -(-np.asarray(state["count"]) // N))
    assert (np.sort(held_LBKM, axis=-1)[..., ::-1] == held_LBKM).all()  # held pages first in each table row
    assert all(p >= 0 for layer in _held_positions(state) for row in layer for head in row for p in head)


@pytest.mark.parametrize("kv_heads,window,page_size,growth,threshold,kernels", [
    (1, 0, 4, 2 ** 0.5, 0.0, "xla"),
    (2, 3, 2, 0.0, 0.3, "xla"),
    (2, 5, 4, 2 ** 0.5, 0.0, "pallas"),  # the paged DMC cache's Pallas kernel (interpret mode off the GPU)
])
def test_paged_equals_dms_with_an_unbounded_buffer(kv_heads, window, page_size, growth, threshold, kernels):
    cfg = tiny_config(num_kv_heads=kv_heads, num_heads=4)
    params = init_params(cfg, jax.random.PRNGKey(kv_heads))
    dms, steps = _dms(window), 12
    tokens_BT = jax.random.randint(jax.random.PRNGKey(7), (3, 14 + steps), 0, cfg.vocab_size)
    lengths_B = jnp.array([9, 1, 14])  # ragged, one prompt of a single token
    unbounded = DMSCache(dms, threshold=threshold)  # capacity 0, no target CR: max_tokens slots
    want, state_a = _cached_logits(cfg, params, unbounded, tokens_BT, lengths_B, steps)
    method = DMSPagedCache(dms, page_size=page_size, attend_growth=growth, threshold=threshold, kernels=kernels)
    got, state_b = _cached_logits(cfg, params, method, tokens_BT, lengths_B, steps)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-4, rtol=1e-4)
    pos_a = np.asarray(state_a["pos"])
    kept_a = [[[sorted(int(p) for p in pos_a[l, b, k] if p >= 0) for k in range(kv_heads)] for b in range(3)]
              for l in range(cfg.num_layers)]
    assert _held_positions(state_b) == kept_a  # the same tokens, head by head
    assert 0 < np.asarray(state_b["count"]).sum() < cfg.num_layers * kv_heads * int(jnp.sum(lengths_B + steps))
    _check_accounting(state_b)
    method.check(state_b)
    stats_a, stats_b = unbounded.stats(state_a, lengths_B + steps), method.stats(state_b, lengths_B + steps)
    np.testing.assert_array_equal(stats_b["kept_LBK"], stats_a["kept_LBK"])
    assert float(stats_b["compression_ratio"]) == float(stats_a["compression_ratio"]) > 1


def test_scanned_layers_equal_unrolled_and_are_what_evaluations_use():
    """dms_paged asks for the scanned layer layout (its unrolled decode compiles ~10x longer): both layouts give the
    same logits and keep the same tokens; llama.layers_for hands it stacked weights and leaves dense's as given."""
    from dmc_jax.cache.dense import DenseCache

    cfg = tiny_config(num_kv_heads=2, num_heads=4)
    params = init_params(cfg, jax.random.PRNGKey(3))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(5), (2, 20), 0, cfg.vocab_size)
    lengths_B = jnp.array([8, 5])
    method = DMSPagedCache(_dms(3), page_size=2)
    stacked = llama.layers_for(llama.unstack_layers(params), method)
    assert not isinstance(stacked["layers"], tuple)
    assert isinstance(llama.layers_for(llama.unstack_layers(params), DenseCache())["layers"], tuple)
    want, state_a = _cached_logits(cfg, llama.unstack_layers(params), method, tokens_BT, lengths_B, 8)
    got, state_b = _cached_logits(cfg, stacked, method, tokens_BT, lengths_B, 8)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    assert _held_positions(state_b) == _held_positions(state_a)


# ------------------------------------------------------------------------------------- unbalanced heads, one pool
def _unbalanced_run(method, T=24, steps=24):
    """The cache alone on a tiny shape: layer 0's decisions keep every token, layer 1's mark every token (it keeps
    its last w + 1). Returns (outputs [steps + 1] of [L, B, H, Dh], state, cfg)."""
    cfg = tiny_config(num_kv_heads=2, num_heads=4)
    B, L, H, K, Dh = 1, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    n = T + steps
    q_LBTHD, k_LBTKD, v_LBTKD = (jax.random.normal(jax.random.PRNGKey(i), (L, B, n, h, Dh))
                                 for i, h in enumerate((H, K, K)))
    sign_L = jnp.array([-1.0, 1.0])  # the decision channel (last) of each group's first query head
    q_LBTHD = q_LBTHD.at[:, :, :, ::H // K, -1].set(sign_L[:, None, None, None])
    rope, state = Rope(cfg), method.init(cfg, B, n)
    prefill, decode = jax.jit(method.prefill, static_argnums=6), jax.jit(method.decode, static_argnums=6)
    outs, first = [], []
    for layer in range(L):
        o, state = prefill(state, jnp.int32(layer), q_LBTHD[layer, :, :T], k_LBTKD[layer, :, :T],
                           v_LBTKD[layer, :, :T], jnp.full((B,), T), rope)
        first.append(o[:, -1])
    outs.append(jnp.stack(first))
    for t in range(T, n):
        step = []
        for layer in range(L):
            o, state = decode(state, jnp.int32(layer), q_LBTHD[layer, :, t], k_LBTKD[layer, :, t],
                              v_LBTKD[layer, :, t], jnp.full((B,), t), rope)
            step.append(o)
        outs.append(jnp.stack(step))
    return outs, state, cfg


def test_unbalanced_heads_share_a_pool_sized_for_the_average_cr():
    dms, n, N = _dms(3), 48, 4
    # Kept: 48 tokens in each head of layer 0, w + 1 = 4 in layer 1: CR 48 / 26 ~ 1.85 on average; sized for CR 2.
    want, _, cfg = _unbalanced_run(DMSCache(dms))
    fixed = DMSCache(dms, target_cr=2.0)
    _, state_fixed, _ = _unbalanced_run(fixed)
    with pytest.raises(UserError, match="DMS cache overflow: layer 0"):  # 32 slots per head: layer 0 needs 48
        fixed.check(state_fixed)
    method = DMSPagedCache(dms, page_size=N, target_cr=2.0)
    got, state, _ = _unbalanced_run(method)
    heads = cfg.num_layers * cfg.num_kv_heads
    C = capacity_for(n, 3, 0, 2.0, 1.25)
    assert state["pool_k"].shape[0] == math.ceil(heads * C / N) == 32
    method.check(state)
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state["count"])[:, 0], [[48, 48], [4, 4]])
    # Layer 1 saw 44 tokens leave: their slots were reused, it holds one page per head; the pool's free pages after
    # all these evictions are what the kept tokens leave (12 pages per head of layer 0, 1 of layer 1).
    assert int(np.sum(np.asarray(state["table"][1]) >= 0)) == 2
    stats = method.stats(state, jnp.array([n]))
    assert int(stats["pages_free"]) == 32 - (2 * 12 + 2)
    _check_accounting(state)
    # The bytes: the whole state, about DMSCache's at the same target CR (one pool instead of equal buffers).
    assert stats["bytes_allocated"] == state_bytes(state)
    assert stats["bytes_pool"] == 32 * N * (2 * cfg.head_dim * 4 + 4)  # k, v (fp32), position
    assert state_bytes(state) <= 1.1 * state_bytes(state_fixed)
    # A finished row gives every page back.
    freed = jax.jit(method.free_rows)(state, jnp.array([True]))
    assert int(freed["top"]) == 32 and (np.asarray(freed["table"]) < 0).all()


def test_an_exhausted_pool_is_a_one_line_error_or_counted_with_evict():
    dms, N = _dms(3), 4
    short = DMSPagedCache(dms, page_size=N, pages=22)  # the run needs 26 pages
    _, state, _ = _unbalanced_run(short)
    assert int(state["refused"][0]) > 0 and int(state["refused"][1]) == 0
    with pytest.raises(UserError) as e:
        short.check(state)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("DMS paged cache overflow: layer 0, KV head 0 (sequence 0)")
    assert "cache.dms_paged.pages" in msg and "cache.dms_paged.on_overflow='evict'" in msg
    evict = DMSPagedCache(dms, page_size=N, pages=22, on_overflow="evict")
    _, state, _ = _unbalanced_run(evict)
    evict.check(state)  # allowed, and counted: every token that found no page pushed an older one out
    assert int(np.asarray(state["overflow"]).sum()) == int(state["refused"][0]) > 0
    held = _held_positions(state)
    for head in held[0][0]:  # layer 0 marks nothing: a full head gave up its oldest tokens (DMSCache's rule)
        assert head == list(range(48 - len(head), 48))
    assert sum(len(head) for head in held[0][0]) == 22 * N - 2 * 4  # the pool's slots, but layer 1's page each
    assert held[1][0] == [[44, 45, 46, 47]] * 2
    stats = evict.stats(state, jnp.array([48]))
    assert int(np.asarray(stats["overflow_LBK"]).sum()) > 0 and int(stats["pages_free"]) == 0
    _check_accounting(state)
    tiny = DMSPagedCache(dms, page_size=N, pages=10)  # not even the prompts fit (6 + 6 + 1 + 1 pages)
    _, state, _ = _unbalanced_run(tiny, steps=0)
    with pytest.raises(UserError, match=r"^DMS paged cache out of pages for a new sequence: layer 0, KV head 1"):
        tiny.check(state)
    # With 'evict' the prompt fits: layer 1's heads are reserved what they hold whatever they decide, their last
    # w + 1 = 4 tokens (1 page each); layer 0's split the other 8 (4 pages: their newest 16 tokens, 8 forced out
    # each), layer 1 then takes its 1 page each: the whole pool, nothing lost.
    tiny_evict = DMSPagedCache(dms, page_size=N, pages=10, on_overflow="evict")
    _, state, _ = _unbalanced_run(tiny_evict, steps=0)
    tiny_evict.check(state)
    np.testing.assert_array_equal(np.asarray(state["overflow"])[:, 0], [[8, 8], [0, 0]])
    assert int(np.asarray(state["lost"]).sum()) == 0 and int(state["refused"][1]) == 0
    held = _held_positions(state)
    assert held[0][0] == [list(range(8, 24))] * 2 and held[1][0] == [[20, 21, 22, 23]] * 2
    assert int(state["top"]) == 0
    _check_accounting(state)
    _, state, _ = _unbalanced_run(tiny_evict)  # then decoding 24 more tokens from no free page: counted, accounted
    tiny_evict.check(state)
    assert int(np.asarray(state["overflow"]).sum()) > 24 and int(np.asarray(state["lost"]).sum()) == 0
    _check_accounting(state)
    for bad in (dict(on_overflow="merge"), dict(page_size=0), dict(attend_growth=1.0), dict(pages=-1),
                dict(target_cr=0.5), dict(threshold=float("inf")), dict(kernels="cuda")):
        with pytest.raises(UserError, match="cache.dms_paged."):
            DMSPagedCache(dms, **bad)


def test_a_dms_model_is_served_with_dms_paged():
    hparams = registry.trained_defaults("dms")
    hparams.update(window=16, target_cr=5.0)
    cache = ml_collections.ConfigDict({"method": "dms_paged", "dms_paged": {"page_size": 8, "threshold": 0.5}})
    method = model_method.Resolved("dms_paged", cache, hparams, from_model=True).make()
    assert isinstance(method, DMSPagedCache) and method.dms.window == 16 and method.page_size == 8
    assert method.target_cr == 5.0 and method.threshold == 0.5  # the model's trained CR sizes the pool
    assert registry.get("dms_paged").trained is registry.get("dms").trained
    with pytest.raises(UserError, match="cache.dms_paged has no field capacity"):
        registry.build("dms_paged", ml_collections.ConfigDict({"dms_paged": {"capacity": 8}}), hparams)
