"""Pallas kernels (Triton lowering), each next to a pure-jnp reference of the same function. Imports jax only.

    paged_decode / paged_decode_ref             decode attention over a paged, ragged (per KV head) cache
    dmc_flash_attention / dmc_flash_ref         DMC training attention (causal GQA + merge penalty), fwd + bwd
"""

from pallas_kernels.dmc_flash import dmc_flash_attention, dmc_flash_flops
from pallas_kernels.dmc_flash_ref import dmc_flash_ref
from pallas_kernels.paged_decode import combine_splits, default_pages_per_split, paged_decode, paged_decode_bytes
from pallas_kernels.paged_decode_ref import paged_decode_ref

__all__ = ["paged_decode", "paged_decode_ref", "combine_splits", "default_pages_per_split", "paged_decode_bytes",
           "dmc_flash_attention", "dmc_flash_ref", "dmc_flash_flops"]
