"""Pallas kernels (Triton lowering), each next to a pure-jnp reference of the same function. Imports jax only.

    paged_decode / paged_decode_ref             decode attention over a paged, ragged (per KV head) cache
    dmc_flash_attention / dmc_flash_ref         DMC training attention (causal GQA + merge penalty), fwd + bwd

Backend: the Triton lowering of Pallas. It runs in interpret mode on CPU, compiles on the H100 image (jax 0.11.2)
and lowers to Triton IR on a CPU host (the tests check that for an H100), and Triton emits Hopper's wgmma for the
bf16 tiles. jax 0.12 marks it deprecated in favour of Mosaic GPU (warp specialisation, TMA), the port to make
once a GPU is at hand to check it; the references and tests carry over unchanged.
"""

from pallas_kernels.dmc_flash import dmc_flash_attention, dmc_flash_flops
from pallas_kernels.dmc_flash_ref import dmc_flash_ref
from pallas_kernels.paged_decode import combine_splits, default_pages_per_split, paged_decode, paged_decode_bytes
from pallas_kernels.paged_decode_ref import paged_decode_ref

__all__ = ["paged_decode", "paged_decode_ref", "combine_splits", "default_pages_per_split", "paged_decode_bytes",
           "dmc_flash_attention", "dmc_flash_ref", "dmc_flash_flops"]
