"""Kernel dispatch: the Pallas kernels of pallas_kernels/ or dmc_jax's XLA reference, chosen by one setting.

kernels = 'auto'   Pallas on GPU, XLA elsewhere (the default)
          'pallas' always Pallas (interpret mode off the GPU: slow, for tests)
          'xla'    always the XLA reference
Both paths compute the same function (tests/test_pallas_kernels.py). Callers pass the setting down from their
config; nothing here reads a config.

Shape letters: B batch, T time, H query heads, K KV heads, Dh head dim, P pool pages, N page size, M pages per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dmc_jax.cache import paged_attention
from dmc_jax.errors import UserError
from dmc_jax.model.attention import causal_mask, grouped_attention
from pallas_kernels import dmc_flash_attention, paged_decode
from pallas_kernels.paged_decode import supported as paged_decode_supported

KERNELS = ("auto", "pallas", "xla")


def use_pallas(kernels: str = "auto") -> bool:
    """True when `kernels` selects the Pallas path on the current default backend."""
    if kernels not in KERNELS:
        raise UserError(f"kernels must be one of {', '.join(KERNELS)}; got {kernels!r}")
    return kernels == "pallas" or (kernels == "auto" and jax.default_backend() == "gpu")


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def paged_decode_attention(q_BHD: jax.Array, pool_k_PND: jax.Array, pool_v_PND: jax.Array,
                           block_table_BKM: jax.Array, count_BK: jax.Array, kernels: str = "auto") -> jax.Array:
    """Decode attention [B, H, Dh] over each head's first count[b, k] slots of its pages in the shared pool.

    Slot s of head (b, k) is pool[block_table[b, k, s // N], s % N]. The Pallas path needs N and Dh powers of two
    (Dh >= 16) and falls back to XLA otherwise.
    """
    N, Dh = pool_k_PND.shape[1:]
    if use_pallas(kernels) and paged_decode_supported(N, Dh):
        return paged_decode(q_BHD, pool_k_PND, pool_v_PND, block_table_BKM, count_BK, interpret=_interpret())
    return paged_attention.paged_decode_attention(q_BHD, pool_k_PND, pool_v_PND, block_table_BKM, count_BK)


def key_penalty_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, penalty_BKS: jax.Array,
                          segment_ids_BT: jax.Array | None, kernels: str = "auto") -> jax.Array:
    """Causal attention [B, T, H, Dh] (segments) with a per-key additive logit penalty_BKS applied to every query
    strictly after key s (the diagonal is exempt): DMC's merge mask, log(1 - alpha_{s+1}), is one such vector.

    The XLA path builds the [B, K, T, S] bias; the Pallas flash kernel reads the vector and never builds it.
    """
    if use_pallas(kernels):
        return dmc_flash_attention(q_BTHD, k_BTKD, v_BTKD, penalty_BKS, segment_ids_BT, interpret=_interpret())
    B, T = q_BTHD.shape[:2]
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask_B1TS = causal_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
    below_TS = jnp.arange(T)[None, :] < jnp.arange(T)[:, None]
    bias_BKTS = jnp.where(below_TS[None, None], penalty_BKS[:, :, None, :], 0.0)
    return grouped_attention(q_BTHD, k_BTKD, v_BTKD, mask_B1TS, bias_BKTS)
