"""dmc_jax: KV-cache compression (Dynamic Memory Compression and baselines) for Llama models in JAX."""

__version__ = "0.1.0"
