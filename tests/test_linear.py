"""Custom-VJP matmuls and attention (model/linear.py, model/attention_vjp.py): the same gradients as autodiff of
the einsum references (fp32), and in bf16 every matmul of a training step's forward AND backward is a canonical
bf16 dot (the form XLA:CPU sends to its fast matmul library) instead of being upcast to fp32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.model import attention, attention_vjp, cpu_features, linear, llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params
from dmc_jax.training.objective import LanguageModelObjective


def _grads(f, *args):
    loss = lambda *a: jnp.sum(jnp.sin(f(*a).astype(jnp.float32)))  # a non-trivial cotangent
    return jax.grad(loss, argnums=tuple(range(len(args))))(*args)


@pytest.mark.parametrize("x_shape,w_shape,n_in", [((3, 5, 16), (16, 24), 1), ((1, 16), (16, 8), 1),
                                                   ((2, 7, 4, 8), (4, 8, 12), 2), ((2, 3, 16), (16, 2, 6), 1)])
def test_dense_backward_equals_autodiff(x_shape, w_shape, n_in):
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
    ref = lambda x, w: jnp.tensordot(x, w, axes=n_in)
    got = lambda x, w: linear.dense(x, w, jnp.float32, n_in=n_in, canonical=True)
    np.testing.assert_allclose(got(x, w), ref(x, w), rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(got, x, w), _grads(ref, x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m", [1, 3, 70])  # 1 and 3: the small-M (decode) forward; 70: the training form
def test_dense_transposed_backward_equals_autodiff(m):
    kx, kw = jax.random.split(jax.random.PRNGKey(1))
    x, w = jax.random.normal(kx, (m, 16)), jax.random.normal(kw, (40, 16))
    got = lambda x, w: linear.dense_transposed(x, w, jnp.float32, canonical=True)
    np.testing.assert_allclose(got(x, w), x @ w.T, rtol=1e-5, atol=1e-5)
    for g, r in zip(_grads(got, x, w), _grads(lambda x, w: x @ w.T, x, w)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_dense_mixed_precision_gradient_dtypes():
    """bf16 compute on fp32 inputs: output in bf16, gradients in the inputs' fp32 (master weights, no bf16 copy)."""
    x, w = jnp.ones((4, 8)), jnp.ones((8, 6))
    y = linear.dense(x, w, jnp.bfloat16, canonical=True)
    gx, gw = _grads(lambda x, w: linear.dense(x, w, jnp.bfloat16, canonical=True), x, w)
    assert y.dtype == jnp.bfloat16 and gx.dtype == jnp.float32 and gw.dtype == jnp.float32


@pytest.mark.parametrize("bias", [False, True])
def test_attention_backward_equals_autodiff(bias):
    B, T, H, K, D = 2, 9, 6, 3, 8
    ks = jax.random.split(jax.random.PRNGKey(2), 4)
    q, k, v = (jax.random.normal(kk, (B, T, n, D)) for kk, n in zip(ks[:3], (H, K, K)))
    seg = jnp.ones((B, T), jnp.int32).at[0, -3:].set(0)  # padding rows that attend to nothing
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = attention.causal_mask(pos, pos, seg, seg) & (seg > 0)[:, None, :, None]
    b = jax.random.normal(ks[3], (B, K, T, T)) if bias else None
    ref = lambda q, k, v, b: attention.reference_grouped_attention(q, k, v, mask, b)
    got = lambda q, k, v, b: attention_vjp.grouped_attention(q, k, v, mask, b)
    np.testing.assert_allclose(got(q, k, v, b), ref(q, k, v, b), rtol=1e-6, atol=1e-6)
    args = (q, k, v, b) if bias else (q, k, v)
    wrap = (lambda f: f) if bias else (lambda f: lambda q, k, v: f(q, k, v, None))
    for g, r in zip(_grads(wrap(got), *args), _grads(wrap(ref), *args)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)


def test_training_gradient_equals_reference_path():
    """The model's loss gradient through the custom VJPs equals the einsum path's (fp32, tied embeddings)."""
    cfg = tiny_config(num_layers=2, tie_embeddings=True)
    params = init_params(cfg, jax.random.PRNGKey(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (2, 12), 0, cfg.vocab_size)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(12), (2, 12))}
    loss = lambda p: LanguageModelObjective(cfg).loss(p, batch, None, 0)[0]
    got = jax.grad(loss)(params)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(linear, "use_canonical", lambda canonical=None: False if canonical is None else canonical)
        mp.setattr(attention, "use_canonical", lambda canonical=None: False)
        want = jax.grad(loss)(params)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)


def _dots(hlo: str):
    """(operand dtypes, dot dimension numbers) of every dot in an optimized HLO module."""
    types, dots = {}, []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = (\w+)\[", line)
        if m:
            types[m.group(1)] = m.group(2)
        d = re.search(r" dot\(%(\S+), %(\S+)\), (.*?)(, metadata|$)", line)
        if d:
            dots.append(((types.get(d.group(1)), types.get(d.group(2))), d.group(3)))
    return dots


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's lowering")
def test_bf16_training_step_matmuls_stay_bf16_and_canonical():
    cfg = tiny_config(num_layers=2, embed_dim=64, mlp_dim=128, vocab_size=512, tie_embeddings=True,
                      compute_dtype="bfloat16")
    params = init_params(cfg, jax.random.PRNGKey(5))
    tokens = jnp.ones((4, 32), jnp.int32)
    batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
             "positions": jnp.broadcast_to(jnp.arange(32), (4, 32))}
    step = jax.jit(jax.grad(lambda p: LanguageModelObjective(cfg).loss(p, batch, None, 0)[0]))
    dots = _dots(step.lower(params).compile().as_text())
    # the scanned layer body once: 7 projections + 2 attention forward, 14 + 5 (scores recomputed) backward;
    # the logits: 1 forward + 2 backward
    assert len(dots) >= 31, len(dots)
    for operands, dims in dots:
        assert operands == ("bf16", "bf16"), (operands, dims)  # not upcast to fp32
        # canonical: lhs contracts its last dim, rhs the first dim after its batch dims
        batch_dims = re.search(r"lhs_batch_dims=\{([\d,]*)\}", dims)
        nb = len(batch_dims.group(1).split(",")) if batch_dims else 0
        assert f"lhs_contracting_dims={{{nb + 1}}}" in dims and f"rhs_contracting_dims={{{nb}}}" in dims, dims
    grads = step(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))  # fp32 gradients for fp32 master weights


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA:CPU's lowering")
@pytest.mark.parametrize("batch", [1, 8])
def test_bf16_decode_step_matmuls_stay_bf16(batch):
    from dmc_jax.cache.dense import DenseCache
    cfg = tiny_config(num_layers=2, embed_dim=64, mlp_dim=128, vocab_size=512, tie_embeddings=True,
                      compute_dtype="bfloat16", param_dtype="bfloat16")
    params = llama.unstack_layers(init_params(cfg, jax.random.PRNGKey(6)))
    method = DenseCache()
    state = method.init(cfg, batch, 16)
    step = jax.jit(lambda p, s: llama.decode_step(p, jnp.ones((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32),
                                                  s, method, cfg))
    dots = _dots(step.lower(params, state).compile().as_text())
    assert dots and all(operands == ("bf16", "bf16") for operands, _ in dots), dots


def test_cpu_features_pick_bf16_only_with_fast_bf16_matmuls():
    assert cpu_features.default_compute_dtype(frozenset({"avx2", "avx512f", "avx512_bf16"})) == "bfloat16"
    assert cpu_features.default_compute_dtype(frozenset({"avx2", "amx_tile", "amx_bf16"})) == "bfloat16"
    assert cpu_features.default_compute_dtype(frozenset({"avx2", "avx512f"})) == "float32"
    assert cpu_features.default_compute_dtype(frozenset()) == "float32"


def test_smollm2_auto_variant_follows_the_cpu():
    import os

    from dmc_jax.config_loader import parse_argv
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smollm2.py")
    config = parse_argv(["--config", path + ":auto"])
    assert config.model.compute_dtype == config.model.param_dtype == cpu_features.default_compute_dtype()
    assert parse_argv(["--config", path]).model.compute_dtype == "float32"  # the parity path
