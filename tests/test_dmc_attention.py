"""DMC's parallel training form against the sequential reference, the vanilla limit, and gradient flow."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from dmc_jax.dmc.accumulate import accumulate
from dmc_jax.dmc.attention import DMCAttention, dmc_core
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.dmc.decisions import sequence_starts, zero_channel
from dmc_jax.dmc.reference import sequential_dmc
from dmc_jax.dmc.surgery import zero_decision_rows
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import init_params
from tests import jitted


def _positions(segment_ids_BT):
    """0, 1, 2, ... restarting at every segment."""
    seg = np.asarray(segment_ids_BT)
    pos = np.zeros_like(seg)
    for b in range(seg.shape[0]):
        for t in range(1, seg.shape[1]):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    return jnp.asarray(pos, jnp.int32)


# Jitted: one program per call's shapes, not one per operation (eager, a 1024-token scan compiles ~400 programs).
_dmc_core = jax.jit(dmc_core, static_argnums=(8, 9, 10))
_accumulate = jax.jit(accumulate, static_argnums=3)


@settings(max_examples=12, deadline=None)
@given(B=st.integers(1, 2), T=st.sampled_from([1, 7, 12]), K=st.sampled_from([1, 2]), G=st.sampled_from([1, 3]),
       window=st.sampled_from([None, 1, 2, 5]), p_merge=st.sampled_from([0.0, 0.5, 0.9, 1.0]),
       packed=st.booleans(), zero_after_rope=st.booleans(), seed=st.integers(0, 2**16))
def test_parallel_hard_form_equals_sequential_reference(B, T, K, G, window, p_merge, packed, zero_after_rope, seed):
    Dh, H = 8, K * G
    rng = np.random.default_rng(seed)  # numpy draws: jax.random would compile anew for every example's shapes
    q, k, v = (jnp.asarray(rng.normal(size=(B, T, n, Dh)), jnp.float32) for n in (H, K, K))
    omega = jnp.asarray(rng.uniform(0.01, 1.0, (B, T, K)), jnp.float32)
    segments = None
    if packed:
        segments = jnp.asarray(np.sort(rng.integers(1, 3, (B, T)), axis=1), jnp.int32)
    starts = sequence_starts(B, T, segments)
    alpha = jnp.asarray(rng.uniform(size=(B, T, K)) < p_merge, jnp.float32)
    alpha = jnp.where(starts[..., None], 0.0, alpha)
    dmc = DMCConfig(window=window, mode="hard", zero_after_rope=zero_after_rope)
    ch = dmc.channel(Dh)
    q, k = zero_channel(q, ch), zero_channel(k, ch)
    positions = _positions(segments) if packed else jnp.broadcast_to(jnp.arange(T), (B, T))
    rope = Rope(tiny_config(head_dim=Dh))
    got = _dmc_core(q, k, v, alpha, alpha * 20 - 10, omega, positions, segments, rope, ch, dmc)
    want, _ = sequential_dmc(q, k, v, alpha, omega, rope, ch, window, segments, zero_after_rope)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=2e-5)


def test_windowed_and_unbounded_accumulation_agree_when_runs_fit_the_window():
    alpha = jnp.array([[0, 1, 1, 0, 1, 0, 1, 1]], jnp.float32)[..., None]
    omega = jnp.linspace(0.1, 1.0, 8)[None, :, None]
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 1, 4))
    (unbounded,) = _accumulate(alpha, omega, (x,), None)
    (windowed,) = _accumulate(alpha, omega, (x,), 3)
    np.testing.assert_allclose(unbounded, windowed, atol=1e-6)
    (short,) = _accumulate(alpha, omega, (x,), 2)  # the run 5..7 is longer than 2: only the last 2 count
    np.testing.assert_allclose(short[0, 7], (omega[0, 6] * x[0, 6] + omega[0, 7] * x[0, 7]) / (omega[0, 6] + omega[0, 7]),
                               atol=1e-6)


def _dmc_model():
    cfg = tiny_config(num_layers=2)
    params = zero_decision_rows(init_params(cfg, jax.random.PRNGKey(0)), DMCConfig())
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)
    return cfg, params, tokens


def test_all_append_dmc_equals_vanilla_exactly():
    """After the zero-out surgery, with every decision 'append', DMC is the vanilla model bit for bit."""
    cfg, params, tokens = _dmc_model()
    for window in (None, 12):
        dmc = DMCConfig(mode="append", window=window, zero_after_rope=False)
        dmc_logits, aux = jitted.forward_aux(params, tokens, cfg=cfg, attention=DMCAttention(dmc))
        np.testing.assert_array_equal(np.asarray(dmc_logits), np.asarray(jitted.forward(params, tokens, cfg=cfg)))
        assert float(jnp.max(aux["alpha_st_BTK"])) == 0.0


def test_gradients_reach_the_decision_and_importance_channels():
    cfg, params, tokens = _dmc_model()
    # Make decisions undecided (a ~ 0) so the relaxed alphas sit where the sigmoid has slope.
    params["layers"]["k"] = params["layers"]["k"].at[..., -1].set(0.3)

    def loss(p):
        logits, aux = llama.forward_aux(p, tokens, cfg, attention=DMCAttention(DMCConfig(mode="train")),
                                        rng=jax.random.PRNGKey(3))
        return jnp.mean(jax.nn.logsumexp(logits, -1)) + jnp.mean(aux["alpha_st_BTK"])

    g = jax.jit(jax.grad(loss))(params)["layers"]
    assert float(jnp.abs(g["k"][..., -1]).sum()) > 0  # decision channel of W_k
    assert float(jnp.abs(g["q"][..., -1]).sum()) > 0  # importance channel of W_q


def test_train_mode_noise_changes_decisions_and_hard_mode_is_deterministic():
    cfg, params, tokens = _dmc_model()
    run = lambda mode, seed: jitted.forward_aux(params, tokens, cfg=cfg, attention=DMCAttention(DMCConfig(mode=mode)),
                                                rng=jax.random.PRNGKey(seed))[1]["alpha_BTK"]
    assert not np.array_equal(run("train", 0), run("train", 1))
    np.testing.assert_array_equal(run("hard", 0), run("hard", 1))


def test_windowed_accumulation_stays_accurate_over_long_runs():
    T, w = 1024, 12
    rng = np.random.default_rng(0)
    alpha = (rng.uniform(size=(1, T, 1)) < 0.995).astype(np.float32)  # runs hundreds of tokens long
    alpha[0, 0] = 0
    omega = rng.uniform(0.01, 1.0, size=(1, T, 1)).astype(np.float32)
    x = rng.normal(size=(1, T, 1, 4)).astype(np.float32)
    (got,) = _accumulate(jnp.asarray(alpha), jnp.asarray(omega), (jnp.asarray(x),), w)
    want = np.zeros_like(x, dtype=np.float64)
    start = 0
    for t in range(T):
        if alpha[0, t, 0] == 0:
            start = t
        js = range(max(start, t - w + 1), t + 1)
        want[0, t] = sum(omega[0, j, 0] * x[0, j].astype(np.float64) for j in js) / sum(omega[0, j, 0] for j in js)
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-4, rtol=1e-4)
