"""One entry point for KV-head compression: a method name and calibration text -> the converted model.

    mean    mean pooling of each group's K/V weights (GQA init)
    svd_a   SVD of the calibration cache (strategy B: fold before RoPE; strategy A: project after RoPE)
    svd_w   SVD of the grouped K/V weights, folded like svd_a strategy B

Calibration text is training text only (never the held-out files): the default corpus's train/ split unless
files are given, cut into `sequences` rows of `seq_len` tokens spread evenly over the text.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.kv_heads import mean_pool, rope_projected, svd
from dmc_jax.kv_heads.activations import calibration_grams
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.llama import unstack_layers
from dmc_jax.model.params import Params


@dataclasses.dataclass
class Converted:
    """A converted model; wrap (strategy A only) turns any cache method into one that projects rotated q/k."""

    cfg: ModelConfig
    params: Params  # stacked layout
    wrap: Optional[Callable] = None
    description: str = ""

    @property
    def exportable(self) -> bool:
        return self.wrap is None


def stacked(params: Params) -> Params:
    """The stacked layout (layers on a leading axis) from the inference layout (a tuple of layers)."""
    if not isinstance(params["layers"], tuple):
        return params
    layers = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]), *params["layers"])
    return {**params, "layers": layers}


def default_calibration_files() -> list[str]:
    from dmc_jax.data import default_corpus

    root = default_corpus.ensure_default_corpus(default_corpus.DEFAULT_CACHE_DIR)
    return sorted(str(p) for p in (root / "train").glob("*.txt"))


def calibration_tokens(tokenizer, files: Sequence[str], sequences: int, seq_len: int) -> np.ndarray:
    """[sequences, seq_len] token rows spread evenly over the files' text (each file tokenized on its own)."""
    from dmc_jax.evaluation.text_files import read_text

    rows = []
    for path in files:
        ids = np.asarray(tokenizer.encode(read_text(path)), np.int32)
        rows.extend(ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len))
    if len(rows) < sequences:
        raise UserError(f"the calibration text holds {len(rows)} rows of {seq_len} tokens, fewer than "
                        f"kv_heads.calib_sequences={sequences}; give more text or lower the count")
    pick = np.linspace(0, len(rows) - 1, sequences).round().astype(int)
    return np.stack([rows[i] for i in pick])


def calibrate(c, params: Params, cfg: ModelConfig, tokenizer):
    """The calibration Gram matrices of svd_a for the kv_heads section `c` (its files, rows and batch)."""
    import time

    files = [f.strip() for f in c.calib_files.split(",") if f.strip()] or default_calibration_files()
    tokens = calibration_tokens(tokenizer, files, c.calib_sequences, c.calib_seq_len)
    start = time.perf_counter()
    batches = (tokens[i:i + c.calib_batch] for i in range(0, len(tokens), c.calib_batch))
    grams = calibration_grams(params, cfg, batches, c.new_kv_heads)
    print(f"[kv_heads] calibration on {tokens.shape[0]}x{tokens.shape[1]} tokens "
          f"({time.perf_counter() - start:.0f} s)", flush=True)
    return grams


def convert(cfg: ModelConfig, params: Params, method: str, new_kv_heads: int, rope: str = "B", rank: int = 0,
            tokens_NT: Optional[np.ndarray] = None, batch: int = 4, grams: Optional[dict] = None) -> Converted:
    """Converts (cfg, params) to new_kv_heads shared KV heads; svd_a needs calibration tokens [N, T] (or their
    Gram matrices from activations.calibration_grams, to share one calibration between strategies)."""
    params = stacked(params)
    try:
        t = mean_pool.check_groups(cfg, new_kv_heads)
    except ValueError as e:
        raise UserError(f"kv_heads.new_kv_heads: {e}") from None
    r = rank or cfg.head_dim
    if r > t * cfg.head_dim:
        raise UserError(f"kv_heads.rank={r} exceeds t * head_dim = {t * cfg.head_dim}")
    what = f"{method} {cfg.num_kv_heads}->{new_kv_heads} KV heads"
    if method == "mean":
        return Converted(*mean_pool.mean_pool(cfg, params, new_kv_heads), description=what)
    if method == "svd_w":
        grams = svd.weight_grams(params, new_kv_heads)
        new_cfg, new_params = svd.fold(cfg, params, svd.top_basis(grams["k"], r), svd.top_basis(grams["v"], r))
        return Converted(new_cfg, new_params, description=f"{what}, rank {r}")
    if method != "svd_a":
        raise UserError(f"kv_heads.method must be one of mean, svd_a, svd_w; got {method!r}")
    if grams is None:
        if tokens_NT is None:
            raise ValueError("svd_a needs calibration tokens")
        batches = (tokens_NT[i:i + batch] for i in range(0, len(tokens_NT), batch))
        grams = calibration_grams(unstack_layers(jax.device_put(params)), cfg, batches, new_kv_heads)
        what = f"{what}, calibrated on {tokens_NT.shape[0]}x{tokens_NT.shape[1]} tokens"
    phi = svd.top_basis(grams["v"], r)
    what = f"{what}, rank {r}, RoPE strategy {rope}"
    if rope == "A":
        new_cfg, new_params, wrap = rope_projected.convert(cfg, params, svd.top_basis(grams["k_rot"], r), phi)
        return Converted(new_cfg, new_params, wrap, description=what)
    return Converted(*svd.fold(cfg, params, svd.top_basis(grams["k"], r), phi), description=what)


def convert_from_config(c, cfg: ModelConfig, params: Params, tokenizer, method: Optional[str] = None,
                        rope: Optional[str] = None, grams: Optional[dict] = None) -> Converted:
    """convert() with the fields of a `kv_heads` config section (calibration text read only when needed);
    method / rope override the section's."""
    method, rope = method or c.method, rope or c.rope
    if cfg.qk_norm:  # pooled / projected W_k would be followed by a norm computed on the original heads
        raise UserError("KV-head conversion does not support models with per-head q/k norms (Qwen3) yet")
    if cfg.dms_adapter:  # its [D, K] decision maps are per original KV head
        raise UserError("KV-head conversion does not support models with DMS decision adapters")
    tokens = None
    if method == "svd_a" and grams is None:
        files = [f.strip() for f in c.calib_files.split(",") if f.strip()] or default_calibration_files()
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise UserError(f"kv_heads.calib_files: {missing[0]} not found")
        tokens = calibration_tokens(tokenizer, files, c.calib_sequences, c.calib_seq_len)
    return convert(cfg, params, method, c.new_kv_heads, rope, c.rank, tokens, c.calib_batch, grams)
