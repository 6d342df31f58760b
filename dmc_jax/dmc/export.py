"""A DMC-retrofitted model as a Hugging Face directory plus `dmc_config.json` (its DMC hyper-parameters).

The weights are an ordinary Llama checkpoint (the decision and importance channels are columns of W_k / W_q), so
transformers loads them; what it cannot know is how the DMC cache reads them (window, channel, offset, the target
CR it was trained for). That lives in dmc_config.json next to config.json, and every task that builds a DMC cache
for model.source=<dir> takes it from there (`section_for`), so a model is never served with hyper-parameters it was
not trained with.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import ml_collections


DMC_FILE = "dmc_config.json"


def save(path: str, cfg, params, tokenizer, dmc_section: ml_collections.ConfigDict, overwrite: bool = True) -> str:
    """Writes the HF directory (atomically, with the tokenizer and dmc_config.json); returns its path."""
    from dmc_jax.weights.hf_io import save_hf_dir, tokenizer_files_of

    files = tokenizer_files_of(tokenizer) | {DMC_FILE: json.dumps(dmc_section.to_dict(), indent=2, sort_keys=True)}
    save_hf_dir(path, cfg, params, tokenizer_files=files, overwrite=overwrite)
    return path


def section_for(source: str) -> Optional[ml_collections.ConfigDict]:
    """The `dmc` section saved with the model at `source` (a directory), or None if it has none."""
    path = os.path.join(os.path.expanduser(source), DMC_FILE) if isinstance(source, str) else ""
    if not path or not os.path.isfile(path):
        return None
    from dmc_jax.dmc.objective import default_config, validate
    from dmc_jax.user_files import read_json, saved_section

    return saved_section(path, read_json(path, "DMC file"), default_config(), validate,
                         fix="re-export the model with task=retrofit")


def method_sections(config: ml_collections.ConfigDict) -> tuple:
    """(cache section, dmc section) for cache.registry.make_method. A model directory's dmc_config.json also sizes a
    DMC cache left unsized (cache.target_cr 0) for the CR the model was trained for."""
    saved = section_for(config.model.source) if "model" in config else None
    cache = config.cache
    if saved is not None and cache.method.startswith("dmc") and not cache.get("target_cr", 0.0):
        cache = ml_collections.ConfigDict(cache.to_dict())
        cache.target_cr = float(saved.target_cr)
    return cache, (saved if saved is not None else config.get("dmc"))
