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

from dmc_jax.dmc.config import DMCConfig
from dmc_jax.errors import UserError
from dmc_jax.cache import paged_attention
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


def dmc_attention(q_BTHD: jax.Array, khat_BTKD: jax.Array, vhat_BTKD: jax.Array, alpha_BTK: jax.Array,
                  z_BTK: jax.Array, segment_ids_BT: jax.Array | None, dmc: DMCConfig,
                  kernels: str = "auto") -> jax.Array:
    """DMC training-form attention [B, T, H, Dh] (causal, segments, merge penalty) on rotated q and slots.

    The XLA path is dmc_core's grouped_attention with merge_penalty's T x T bias; the Pallas path never builds it.
    """
    from dmc_jax.dmc.attention import merge_penalty, penalty_vector  # at call time: dmc.attention imports us

    if use_pallas(kernels):
        pen_BKT = penalty_vector(alpha_BTK, z_BTK, dmc)
        return dmc_flash_attention(q_BTHD, khat_BTKD, vhat_BTKD, pen_BKT, segment_ids_BT, interpret=_interpret())
    B, T = q_BTHD.shape[:2]
    index_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask_B1TS = causal_mask(index_BT, index_BT, segment_ids_BT, segment_ids_BT)
    return grouped_attention(q_BTHD, khat_BTKD, vhat_BTKD, mask_B1TS, merge_penalty(alpha_BTK, z_BTK, dmc))
