"""The `convert` config section: task convert_megatron (a Megatron-LM checkpoint -> a Hugging Face directory)."""

from __future__ import annotations

import ml_collections

from dmc_jax.errors import require

DTYPES = ("", "bfloat16", "float16", "float32")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.source = ""        # Megatron checkpoint: its directory (mp_rank_00/model_optim_rng.pt) or the .pt file
    c.tokenizer = ""     # the model's tokenizer: a Hugging Face directory or a tokenizer.model; '' = none copied
    c.output = ""        # Hugging Face directory written; '' = <run dir>/model
    c.dtype = ""         # weights written: '' = as stored (NVIDIA's DMC models: bfloat16) | bfloat16 | float16 | float32
    c.target_cr = 0.0    # the CR the DMC cache is sized for; 0 = the checkpoint's own --dmc-cr
    c.trim_vocab = True  # drop Megatron's vocabulary padding rows beyond the tokenizer's vocabulary
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    require(bool(c.source), "convert.source is empty; give the Megatron checkpoint directory "
                            "(the one holding mp_rank_00/model_optim_rng.pt)")
    require(c.dtype in DTYPES, f"convert.dtype must be one of {', '.join(repr(d) for d in DTYPES)}; got {c.dtype!r}")
    require(c.target_cr == 0 or c.target_cr >= 1, f"convert.target_cr must be 0 (from the checkpoint) or >= 1; "
                                                  f"got {c.target_cr}")
    require(isinstance(c.trim_vocab, bool), f"convert.trim_vocab must be True or False; got {c.trim_vocab!r}")
