"""Pallas kernels == their jnp references (interpret mode on CPU), references == dmc_jax's XLA functions, and the
kernels lower to Triton IR for an H100 (cross-lowering on CPU: catches non-power-of-two tiles and unsupported
ops without a GPU). Shapes are tiny: interpret mode runs every grid step in Python.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax import kernels as dispatch
from dmc_jax.dmc.attention import merge_penalty, penalty_vector
from dmc_jax.dmc.config import DMCConfig
from dmc_jax.errors import UserError
from dmc_jax.model.attention import causal_mask, decode_attention, grouped_attention
from pallas_kernels import dmc_flash_attention, dmc_flash_ref, paged_decode, paged_decode_ref

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.all(np.isfinite(a)), "non-finite output"
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def paged_inputs(rng, B, K, G, Dh, N, M, dtype, counts=None):
    """A shuffled pool shared by all heads, distinct pages per head, ragged counts (>= 1 unless given)."""
    P = B * K * M + 3
    q = jnp.asarray(rng.normal(size=(B, K * G, Dh)), dtype)
    pool_k = jnp.asarray(rng.normal(size=(P, N, Dh)), dtype)
    pool_v = jnp.asarray(rng.normal(size=(P, N, Dh)), dtype)
    table = jnp.asarray(rng.permutation(P)[:B * K * M].reshape(B, K, M), jnp.int32)
    if counts is None:
        counts = rng.integers(1, M * N + 1, size=(B, K))
    return q, pool_k, pool_v, table, jnp.asarray(counts, jnp.int32)


# ------------------------------------------------------------------------------------------------ paged decode
@pytest.mark.parametrize("B,K,G,Dh,N,M,ppb,pps,dtype", [
    (2, 2, 3, 16, 16, 5, 1, 2, jnp.float32),    # GQA 3, splits of 2 pages, ragged
    (1, 3, 1, 32, 32, 3, 2, None, jnp.float32),  # MHA, 2 pages per inner step, default split
    (2, 1, 4, 16, 64, 2, 1, 1, jnp.bfloat16),   # page 64, one page per split
    (1, 2, 2, 16, 16, 8, 4, 4, jnp.bfloat16),   # 4 pages per step
])
def test_paged_decode_matches_reference(B, K, G, Dh, N, M, ppb, pps, dtype):
    rng = np.random.default_rng(B * 100 + M)
    q, pk, pv, table, count = paged_inputs(rng, B, K, G, Dh, N, M, dtype)
    # edge counts: one slot, a full page boundary, every slot
    count = count.at[0, 0].set(1).at[-1, -1].set(M * N)
    if B * K > 2:
        count = count.at[0, 1].set(N)
    out = paged_decode(q, pk, pv, table, count, pages_per_block=ppb, pages_per_split=pps, interpret=True)
    ref = paged_decode_ref(q, pk, pv, table, count)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel(out, ref) < TOL[dtype]


def test_paged_decode_empty_head_and_unused_table_entries():
    rng = np.random.default_rng(1)
    q, pk, pv, table, _ = paged_inputs(rng, 1, 2, 2, 16, 16, 4, jnp.float32, counts=[[0, 20]])
    table = table.at[0, 1, 2:].set(-1)  # entries past the count may be unallocated
    out = paged_decode(q, pk, pv, table, jnp.asarray([[0, 20]], jnp.int32), pages_per_split=2, interpret=True)
    ref = paged_decode_ref(q, pk, pv, table, jnp.asarray([[0, 20]], jnp.int32))
    assert np.all(np.asarray(out[0, :2]) == 0.0)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paged_reference_equals_decode_attention(seed):
    rng = np.random.default_rng(seed)
    B, K, G, Dh, N, M = rng.integers(1, 4), rng.integers(1, 4), rng.integers(1, 4), 8, 4 * rng.integers(1, 5), 6
    q, pk, pv, table, count = paged_inputs(rng, B, K, G, Dh, N, M, jnp.float32)
    dense_k = pk[table].reshape(B, K, M * N, Dh)
    dense_v = pv[table].reshape(B, K, M * N, Dh)
    valid = jnp.arange(M * N)[None, None] < count[..., None]
    assert rel(paged_decode_ref(q, pk, pv, table, count), decode_attention(q, dense_k, dense_v, valid)) < 1e-5
    xla = dispatch.paged_decode_attention(q, pk, pv, table, count, kernels="xla")
    assert rel(xla, decode_attention(q, dense_k, dense_v, valid)) < 1e-6


# ------------------------------------------------------------------------------------------ DMC flash attention
def flash_inputs(rng, B, T, K, G, Dh, dtype, segments):
    q = jnp.asarray(rng.normal(size=(B, T, K * G, Dh)), dtype)
    k = jnp.asarray(rng.normal(size=(B, T, K, Dh)), dtype)
    v = jnp.asarray(rng.normal(size=(B, T, K, Dh)), dtype)
    pen = jnp.asarray(np.log(rng.uniform(0.02, 1.0, size=(B, K, T))), jnp.float32)
    pen = pen.at[:, :, ::5].set(-1e9)  # hard-mode hidden slots
    seg = None
    if segments == "any":  # ids that recur non-contiguously: a segment is every token with the same id
        seg = jnp.asarray(rng.integers(0, 3, size=(B, T)), jnp.int32)
    elif segments == "many":  # packed short documents: whole key blocks are skipped
        seg = jnp.asarray(np.sort(rng.integers(0, max(2, T // 6), size=(B, T)), axis=1), jnp.int32)
    elif segments:
        seg = jnp.asarray(np.sort(rng.integers(0, 3, size=(B, T)), axis=1), jnp.int32)
    do = jnp.asarray(rng.normal(size=(B, T, K * G, Dh)), dtype)
    return q, k, v, pen, seg, do


@pytest.mark.parametrize("B,T,K,G,Dh,bq,bk,dtype,segments", [
    (2, 40, 2, 2, 16, 16, 32, jnp.float32, False),  # T not a block multiple, block_q < block_k
    (1, 48, 1, 3, 24, 32, 16, jnp.float32, True),   # Dh padded 24 -> 32, block_q > block_k, segments
    (1, 32, 2, 1, 16, 16, 16, jnp.bfloat16, True),  # MHA, bf16
    (2, 64, 1, 2, 16, 16, 16, jnp.float32, "many"),  # short documents: block skipping by segment bounds
    (1, 64, 1, 2, 16, 16, 32, jnp.float32, "any"),   # non-contiguous segment ids
])
def test_dmc_flash_matches_reference_with_gradients(B, T, K, G, Dh, bq, bk, dtype, segments):
    rng = np.random.default_rng(T + Dh)
    q, k, v, pen, seg, do = flash_inputs(rng, B, T, K, G, Dh, dtype, segments)
    out_k, vjp_k = jax.vjp(lambda *a: dmc_flash_attention(*a, seg, block_q=bq, block_k=bk, interpret=True),
                           q, k, v, pen)
    out_r, vjp_r = jax.vjp(lambda *a: dmc_flash_ref(*a, seg), q, k, v, pen)
    assert out_k.shape == q.shape and out_k.dtype == dtype
    assert rel(out_k, out_r) < TOL[dtype]
    for name, gk, gr in zip(("dq", "dk", "dv", "dpen"), vjp_k(do), vjp_r(do)):
        assert gk.shape == gr.shape, name
        assert rel(gk, gr) < TOL[dtype], name


@pytest.mark.parametrize("mode,segments", [("train", False), ("train", True), ("hard", True)])
def test_flash_reference_equals_grouped_attention_with_merge_penalty(mode, segments):
    """dmc_flash_ref(pen = penalty_vector) == dmc_core's grouped_attention + merge_penalty, values and grads."""
    rng = np.random.default_rng(len(mode) + segments)
    B, T, K, G, Dh = 2, 12, 2, 2, 8
    q, k, v, _, seg, do = flash_inputs(rng, B, T, K, G, Dh, jnp.float32, segments)
    z = jnp.asarray(rng.normal(size=(B, T, K)), jnp.float32)
    alpha = jax.nn.sigmoid(z).at[:, 0].set(0.0)  # the first token always appends
    dmc = DMCConfig(mode=mode)
    pen = penalty_vector(alpha, z, dmc)
    below = jnp.arange(T)[None, :] < jnp.arange(T)[:, None]
    assert np.array_equal(np.asarray(jnp.where(below, pen[:, :, None, :], 0.0)),
                          np.asarray(merge_penalty(alpha, z, dmc)))
    index = jnp.broadcast_to(jnp.arange(T), (B, T))
    mask = causal_mask(index, index, seg, seg)

    def xla(q, k, v, z):
        return grouped_attention(q, k, v, mask, merge_penalty(alpha, z, dmc))

    def ref(q, k, v, z):
        return dmc_flash_ref(q, k, v, penalty_vector(alpha, z, dmc), seg)

    out_x, vjp_x = jax.vjp(xla, q, k, v, z)
    out_r, vjp_r = jax.vjp(ref, q, k, v, z)
    assert rel(out_r, out_x) < 1e-5
    for gr, gx in zip(vjp_r(do), vjp_x(do)):
        if mode == "hard" and gx.ndim == 3:  # hard decisions carry no gradient to z
            assert np.all(np.asarray(gr) == 0) and np.all(np.asarray(gx) == 0)
            continue
        assert rel(gr, gx) < 1e-5


# ------------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_pallas_equals_xla_and_validates():
    rng = np.random.default_rng(7)
    B, T, K, G, Dh = 1, 20, 1, 2, 16
    q, k, v, _, seg, _ = flash_inputs(rng, B, T, K, G, Dh, jnp.float32, True)
    z = jnp.asarray(rng.normal(size=(B, T, K)), jnp.float32)
    alpha = jax.nn.sigmoid(z).at[:, 0].set(0.0)
    dmc = DMCConfig()
    pen = penalty_vector(alpha, z, dmc)
    got = dispatch.key_penalty_attention(q, k, v, pen, seg, kernels="pallas")
    want = dispatch.key_penalty_attention(q, k, v, pen, seg, kernels="xla")
    assert rel(got, want) < 1e-5
    qd, pk, pv, table, count = paged_inputs(rng, 2, 1, 2, 16, 16, 3, jnp.float32)
    assert rel(dispatch.paged_decode_attention(qd, pk, pv, table, count, kernels="pallas"),
               dispatch.paged_decode_attention(qd, pk, pv, table, count, kernels="xla")) < 1e-5
    assert dispatch.use_pallas("auto") == (jax.default_backend() == "gpu")
    assert not dispatch.use_pallas("xla")
    with pytest.raises(UserError, match="kernels must be one of"):
        dispatch.use_pallas("triton")


# --------------------------------------------------------------------------------------- Triton lowering (H100)
def _pretend_h100(monkeypatch):
    """Lets the Triton lowering run on a CPU-only host by handing it an H100's description (jax internals). setup.cfg
    pins jax to versions whose internals are handled here, so a missing piece is a failure to port, not a skip."""
    try:
        from jax._src.pallas.triton import pallas_call_registration
        try:
            from jax._src import gpu_info  # jax >= 0.12.1
        except ImportError:
            from jax._src.pallas.triton import gpu_info  # jax 0.11.2 - 0.12.0
        h100 = next(v for v in gpu_info.GpuVersion if gpu_info.get_gpu_info_from_version(v).compute_capability == 90)
    except (ImportError, AttributeError, StopIteration) as e:
        pytest.fail(f"jax {jax.__version__}: its Pallas/Triton internals moved, port _pretend_h100 ({e})")
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(h100))


def _lower_cuda(fn, *args) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_kernels_lower_to_triton_for_h100(monkeypatch):
    _pretend_h100(monkeypatch)
    sds = jax.ShapeDtypeStruct
    bf16 = jnp.bfloat16
    B, K, G, Dh, N, M, T = 2, 8, 4, 128, 16, 300, 200
    text = _lower_cuda(paged_decode, sds((B, K * G, Dh), bf16), sds((4000, N, Dh), bf16), sds((4000, N, Dh), bf16),
                       sds((B, K, M), jnp.int32), sds((B, K), jnp.int32))
    assert text.count("custom_call") == 1

    def loss(q, k, v, pen, seg):
        return jnp.sum(dmc_flash_attention(q, k, v, pen, seg, block_q=64, block_k=32).astype(jnp.float32))

    text = _lower_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), sds((B, T, K * G, Dh), bf16), sds((B, T, K, Dh), bf16),
                       sds((B, T, K, Dh), bf16), sds((B, K, T), jnp.float32), sds((B, T), jnp.int32))
    assert text.count("custom_call") == 3  # forward, dk/dv/dpen, dq


# -------------------------------------------------------------------------------------------- random shapes (slow)
@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_kernels_match_references_on_random_shapes(seed):
    """Random shapes, block settings and dtypes for both kernels (each draw compiles anew in interpret mode)."""
    rng = np.random.default_rng(1000 + seed)
    dtype = [jnp.float32, jnp.bfloat16][seed % 2]
    B, K, G = (int(x) for x in rng.integers(1, 4, size=3))
    Dh, N = int(rng.choice([16, 32, 64])), int(rng.choice([16, 32, 64]))
    M = int(rng.integers(1, 7))
    ppb = int(rng.choice([p for p in (1, 2, 4) if p <= M]))
    pps = [None, ppb, 2 * ppb][int(rng.integers(0, 3))]
    q, pk, pv, table, count = paged_inputs(rng, B, K, G, Dh, N, M, dtype)
    out = paged_decode(q, pk, pv, table, count, pages_per_block=ppb, pages_per_split=pps, interpret=True)
    assert rel(out, paged_decode_ref(q, pk, pv, table, count)) < TOL[dtype]

    T, Dh = int(rng.integers(17, 81)), int(rng.choice([8, 16, 40]))
    bq, bk = (int(x) for x in rng.choice([16, 32], size=2))
    q, k, v, pen, seg, do = flash_inputs(rng, 1, T, K, G, Dh, dtype, [False, "many", True, "any"][seed])
    out_k, vjp_k = jax.vjp(lambda *a: dmc_flash_attention(*a, seg, block_q=bq, block_k=bk, interpret=True),
                           q, k, v, pen)
    out_r, vjp_r = jax.vjp(lambda *a: dmc_flash_ref(*a, seg), q, k, v, pen)
    assert rel(out_k, out_r) < TOL[dtype]
    for name, gk, gr in zip(("dq", "dk", "dv", "dpen"), vjp_k(do), vjp_r(do)):
        assert rel(gk, gr) < TOL[dtype], name


# ------------------------------------------------------------------------------------ compiled on a GPU (gpu_only)
gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (compiled Triton kernels)")


@pytest.mark.gpu_only
@gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("N,K,G", [(16, 4, 1), (64, 2, 4)])
def test_paged_decode_compiled_on_gpu(dtype, N, K, G):
    rng = np.random.default_rng(N + G)
    q, pk, pv, table, count = paged_inputs(rng, 3, K, G, 128, N, 40, dtype)
    out = jax.block_until_ready(paged_decode(q, pk, pv, table, count))
    assert rel(out, paged_decode_ref(q, pk, pv, table, count)) < TOL[dtype]


@pytest.mark.gpu_only
@gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("segments", [False, True])
def test_dmc_flash_compiled_on_gpu(dtype, segments):
    rng = np.random.default_rng(3)
    q, k, v, pen, seg, do = flash_inputs(rng, 2, 300, 2, 4, 128, dtype, segments)
    out_k, vjp_k = jax.vjp(lambda *a: dmc_flash_attention(*a, seg), q, k, v, pen)
    out_r, vjp_r = jax.vjp(lambda *a: dmc_flash_ref(*a, seg), q, k, v, pen)
    assert rel(out_k, out_r) < TOL[dtype]
    for name, gk, gr in zip(("dq", "dk", "dv", "dpen"), vjp_k(do), vjp_r(do)):
        assert rel(gk, gr) < TOL[dtype], name
