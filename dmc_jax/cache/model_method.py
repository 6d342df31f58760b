"""A model directory's own cache method: one file, `kv_method.json`, next to config.json.

    {"format": 1, "method": "dmc_paged", "hparams": {...the trained section, e.g. DMC's window, channel, offset,
     target_cr...}, "cache": {...the method's own section when the model was written...}}

transformers loads the weights of such a directory as an ordinary model; what it cannot know is how the cache reads
them. Every task that builds a cache for model.source=<dir> resolves the method here (`resolve`): cache.method
'auto' takes the directory's method, and a trained method (DMC, ...) always takes the hyper-parameters the model was
trained with, so a model is never served with others. Directories written before this file carry
`dmc_config.json` (DMC's section alone); they still load, as method 'dmc_paged'. A directory without either whose
config.json has DMS fields (nvidia/Qwen3-8B-DMS-8x: dms_window_size, dms_alpha_scale, ...) is method 'dms' with
the hyper-parameters those fields give (dmc_jax/dms/hf_config.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Optional

import ml_collections

from dmc_jax.cache import registry
from dmc_jax.dms import hf_config as dms_hf_config
from dmc_jax.errors import UserError
from dmc_jax.user_files import read_json, saved_section

METHOD_FILE = "kv_method.json"
LEGACY_DMC_FILE = "dmc_config.json"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class SavedMethod:
    """What a model directory says about its cache method."""

    method: str
    hparams: Optional[ml_collections.ConfigDict]
    path: str
    cache: Optional[dict] = None  # the method's cache section when the model was written (kv_method.json "cache")


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The method a run uses: its name, the cache section to build it from and the trained hyper-parameters."""

    name: str
    cache: ml_collections.ConfigDict
    hparams: Optional[ml_collections.ConfigDict]
    from_model: bool = False  # hparams are the model directory's: a cache left unsized is sized for its trained CR
    wrap: Optional[Callable] = None  # a model trained for another method: wrap(method) serves its weights as trained

    def make(self, **overrides):
        spec = registry.get(self.name)
        if (self.from_model and spec.sized_by_cr and "target_cr" not in overrides
                and not registry.method_section(self.cache, self.name).get("target_cr", 0.0)):
            overrides["target_cr"] = float(self.hparams.target_cr)
        method = registry.build(self.name, self.cache, self.hparams, **overrides)
        return method if self.wrap is None else self.wrap(method)


def save(path: str, cfg, params, tokenizer, method: str, hparams: Optional[ml_collections.ConfigDict] = None,
         cache: Optional[ml_collections.ConfigDict] = None, overwrite: bool = True) -> str:
    """Writes the HF directory (atomically, with the tokenizer and kv_method.json); returns its path."""
    from dmc_jax.weights.hf_io import save_hf_dir, tokenizer_files_of

    spec = registry.get(method)
    if spec.trained is not None and hparams is None:
        raise UserError(f"saving a model for the trained method {method!r} needs its '{spec.trained.section}' section")
    body = {"format": FORMAT, "method": method,
            "hparams": None if hparams is None else _plain(hparams),
            "cache": _plain(registry.method_section(cache or ml_collections.ConfigDict(), method))}
    files = tokenizer_files_of(tokenizer) | {METHOD_FILE: json.dumps(body, indent=2, sort_keys=True)}
    save_hf_dir(path, cfg, params, tokenizer_files=files, overwrite=overwrite)
    return path


def _plain(section) -> dict:
    return json.loads(json.dumps(section.to_dict() if hasattr(section, "to_dict") else dict(section), default=list))


FIX = "re-export the model (task retrofit or train.export_dir) or fix the file"


def checked_hparams(saved, section_name: str, path: str) -> ml_collections.ConfigDict:
    """The trained section's defaults overridden by `saved`, each value of its default's type and in range; errors
    name the file and the field (the value came from the model directory, not from the user's config)."""
    t = registry.trained(section_name)
    return saved_section(path, saved, registry.trained_defaults(section_name), t.validate, fix=FIX)


def read(source) -> Optional[SavedMethod]:
    """The method saved with the model at `source` (a directory), or None if it has none."""
    if not isinstance(source, str):
        return None
    folder = os.path.expanduser(source)
    path = os.path.join(folder, METHOD_FILE)
    if os.path.isfile(path):
        body = read_json(path, "the model's method file")
        if not isinstance(body, dict):
            raise UserError(f"{path} must hold a JSON object with 'method' and 'hparams'; {FIX}")
        method = body.get("method")
        if not isinstance(method, str):
            raise UserError(f"{path}: 'method' must be a cache method name; got {method!r}")
        try:
            spec = registry.get(method)
        except UserError:
            raise UserError(f"{path} names cache method {method!r}, which this installation does not have; "
                            f"known: {', '.join(registry.names())}") from None
        hparams = None
        if spec.trained is not None:
            hparams = checked_hparams(body.get("hparams", {}), spec.trained.section, path)
        cache = body.get("cache")
        return SavedMethod(method, hparams, path, cache if isinstance(cache, dict) else None)
    legacy = os.path.join(folder, LEGACY_DMC_FILE)
    if os.path.isfile(legacy):
        return SavedMethod("dmc_paged", checked_hparams(read_json(legacy, "the model's method file"), "dmc", legacy),
                           legacy)
    hf = os.path.join(folder, "config.json")
    if os.path.isfile(hf):
        section = dms_hf_config.section_from_hf(read_json(hf, "the model's config.json"), hf)
        if section is not None:
            return SavedMethod("dms", checked_hparams(section, "dms", hf), hf)
    return None


def resolve(config: ml_collections.ConfigDict, method: Optional[str] = None) -> Resolved:
    """The method of a run: `method` or config.cache.method ('auto' = the model directory's, else dense); a trained
    method takes the model directory's hyper-parameters when it was trained for the same section, else the config's
    section (e.g. config.dmc), else that section's defaults. A model trained for DMC or DMS served by a method of
    another section is served as its trained attention runs with nothing compressed (Resolved.wrap)."""
    saved = read(config.model.source) if "model" in config else None
    cache = config.get("cache") or ml_collections.ConfigDict()
    name = method or cache.get("method", registry.AUTO)
    if name == registry.AUTO:
        name = saved.method if saved is not None else "dense"
    spec = registry.get(name)
    hparams, from_model = None, False
    if spec.trained is not None:
        section = spec.trained.section
        if saved is not None and saved.hparams is not None and registry.get(saved.method).trained.section == section:
            hparams, from_model = saved.hparams, True
        elif section in config:
            hparams = config[section]
    return Resolved(name, cache, hparams, from_model, _other_cache_wrap(saved, spec))


def _other_cache_wrap(saved: Optional[SavedMethod], spec) -> Optional[Callable]:
    """How a model trained for a decision-channel method (DMC, DMS) is served by a method of another section
    (dense, H2O, TOVA, ...): its trained attention with nothing compressed (cache/zeroed_channel.py); else None."""
    if saved is None or saved.hparams is None:
        return None
    own = registry.get(saved.method).trained
    if spec.trained is not None and spec.trained.section != own.section:
        same = [n for n in registry.names() if registry.get(n).trained is own]
        raise UserError(f"{saved.path}: the model was trained for {own.section}; cache method {spec.name!r} needs a "
                        f"model trained for {spec.trained.section}: use {' or '.join(same)}, or a training-free "
                        f"method (dense, h2o, tova, ...)")
    if own.other_cache is None or spec.trained is not None:
        return None
    return own.other_cache(saved.hparams)


# Serving fields a model directory records for a trained method that the run may not be using (serving_note).
RECORDED = {"threshold": 0.0, "prompt": "dms"}


def serving_note(config: ml_collections.ConfigDict) -> Optional[str]:
    """One line when model.source is a directory that records serving settings (kv_method.json "cache": e.g. the
    threshold its retrofit calibrated, the prompt rule) other than its defaults and the run serves it, with the same
    trained method, with different ones; None otherwise. The settings stay the run's: this only says so, and how to
    serve as recorded."""
    saved = read(config.model.source) if "model" in config else None
    if saved is None or not saved.cache or saved.hparams is None:
        return None
    resolved = resolve(config)
    spec = registry.get(resolved.name)
    if spec.trained is None or spec.trained is not registry.get(saved.method).trained:
        return None
    section = registry.method_section(resolved.cache, resolved.name)
    differ = [(k, saved.cache[k], section[k]) for k, default in RECORDED.items()
              if k in saved.cache and k in section and saved.cache[k] != default and saved.cache[k] != section[k]]
    if not differ:
        return None
    # values as Python prints them (a float round-trips): the flags set exactly the recorded values
    return (f"note: {saved.path} records " + ", ".join(f"{k} {a}" for k, a, _ in differ) +
            " (what its run measured with); this run serves it with " +
            ", ".join(f"cache.{resolved.name}.{k}={b}" for k, _, b in differ) + "; to serve as recorded pass " +
            " ".join(f"--config.cache.{resolved.name}.{k}={a}" for k, a, _ in differ))


def make(config: ml_collections.ConfigDict):
    """The cache method of a run (see resolve)."""
    return resolve(config).make()
