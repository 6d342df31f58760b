"""Pretrained weights in and out: GGUF files, Hugging Face directories, and the embedded SmolLM2 default."""

from dmc_jax.weights.load import LoadedModel, load_model, load_tokenizer

__all__ = ["LoadedModel", "load_model", "load_tokenizer"]
