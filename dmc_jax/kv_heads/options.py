"""The `kv_heads` config section (task convert_kv_heads, and the kv-head rows of task compare)."""

from __future__ import annotations

import ml_collections

from dmc_jax.errors import require

METHODS = ("mean", "svd_a", "svd_w")
ROPE_STRATEGIES = ("A", "B")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "svd_a"        # mean (GQA init) | svd_a (calibration cache SVD, the paper's) | svd_w (weight SVD)
    c.rope = "B"              # svd: 'B' project before RoPE (a standard GQA model, exportable) | 'A' project the
    #                           rotated q/k at run time (exact in the projected space; not exportable)
    c.new_kv_heads = 1        # KV heads after conversion; must divide the model's (SmolLM2: 3 -> 1 = CR 3)
    c.rank = 0                # new head dim r; 0 = the model's head dim (what a GQA model needs)
    c.calib_files = ""        # comma-separated training text; '' = the default corpus's training split
    c.calib_sequences = 32    # calibration cache: sequences x tokens (the paper: 128 x 2048; 32 x 512 on CPU)
    c.calib_seq_len = 512
    c.calib_batch = 4
    c.output = ""             # convert_kv_heads: HF directory written; '' = <run dir>/model
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    require(c.method in METHODS, f"kv_heads.method must be one of {', '.join(METHODS)}; got {c.method!r}")
    require(c.rope in ROPE_STRATEGIES, f"kv_heads.rope must be one of {', '.join(ROPE_STRATEGIES)}; got {c.rope!r}")
    require(not (c.rope == "A" and c.method != "svd_a"),
            f"kv_heads.rope='A' needs the rotated calibration keys: set kv_heads.method='svd_a' (got {c.method!r})")
    for name in ("new_kv_heads", "calib_sequences", "calib_seq_len", "calib_batch"):
        require(c[name] >= 1, f"kv_heads.{name} must be >= 1; got {c[name]}")
    require(c.rank >= 0, f"kv_heads.rank must be >= 0 (0 = head dim); got {c.rank}")
