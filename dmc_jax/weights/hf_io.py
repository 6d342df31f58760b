"""Reads and writes Hugging Face Llama directories: config.json + safetensors (single or sharded).

Writes are atomic: everything goes to a temporary sibling directory that is renamed into place, so a
crash never leaves a half-written model where a complete one is expected.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params, check_params
from dmc_jax.weights import hf_names

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2 ** 30
_DTYPE_NAMES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}
TokenizerFiles = Union[Mapping[str, Union[str, bytes]], Sequence[str]]


def _read_json(path: str, what: str) -> dict:
    from dmc_jax.user_files import read_json

    if not os.path.exists(path):
        raise UserError(f"{path} does not exist; a Hugging Face model directory needs {what}")
    data = read_json(path, "model file")
    if not isinstance(data, dict):
        raise UserError(f"model file {path} must hold a JSON object, got {type(data).__name__}; fix or re-download it")
    return data


def _shard_files(path: str) -> Dict[str, list]:
    """Safetensors file -> tensor names it should hold, from the index or the single file."""
    if os.path.exists(os.path.join(path, INDEX)):
        weight_map = _read_json(os.path.join(path, INDEX), "an index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{os.path.join(path, INDEX)} has no weight_map; re-download the model")
        files: Dict[str, list] = {}
        for name, fname in weight_map.items():
            files.setdefault(fname, []).append(name)
        return files
    if os.path.exists(os.path.join(path, SINGLE)):
        return {SINGLE: None}
    other = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
    hint = f" (found {other[0]}: convert it to safetensors)" if other else ""
    raise UserError(f"{path} has neither {SINGLE} nor {INDEX}{hint}; dmc_jax reads safetensors weights")


def _read_tensors(path: str, cfg: ModelConfig) -> Dict[str, np.ndarray]:
    """All tensors of the directory, with shapes checked against cfg before any data is read."""
    from safetensors import safe_open

    expected = hf_names.hf_shapes(cfg)
    tensors = {}
    for fname, names in _shard_files(path).items():
        fpath = os.path.join(path, fname)
        if not os.path.exists(fpath):
            raise UserError(f"{fpath} is listed in {INDEX} but missing; re-download the model")
        try:
            with safe_open(fpath, framework="np") as f:
                keys = set(f.keys())
                for name in (sorted(keys) if names is None else names):
                    if name not in keys:
                        raise UserError(f"{fpath} lacks tensor {name} that {INDEX} says it holds; "
                                        f"re-download the model")
                    shape = tuple(f.get_slice(name).get_shape())
                    if name in expected and shape != expected[name]:
                        raise UserError(f"{fpath}: tensor {name} has shape {shape} but config.json implies "
                                        f"{expected[name]}; config and weights disagree")
                    tensors[name] = f.get_tensor(name)
        except UserError:
            raise
        except Exception as e:  # safetensors raises SafetensorError/OSError on corrupt files
            raise UserError(f"{fpath} is not a readable safetensors file ({' '.join(str(e).split())}); "
                            f"re-download it") from None
    return tensors


def load_hf_config(path: str) -> ModelConfig:
    """ModelConfig from a Hugging Face directory's config.json."""
    if not os.path.isdir(path):
        raise UserError(f"{path} is not a directory; give a Hugging Face model directory")
    return hf_names.config_from_hf(_read_json(os.path.join(path, "config.json"), "config.json"))


def load_hf_dir(path: str) -> Tuple[ModelConfig, Params]:
    """(config, params in our layout, dtype as stored) from config.json + safetensors (single or sharded)."""
    cfg = load_hf_config(path)
    return cfg, hf_names.from_hf(cfg, _read_tensors(path, cfg), source=path)


def _shards(sizes: Dict[str, int], max_shard_bytes: int) -> list:
    """Greedy split of tensors (in name order, by bytes) into groups of at most max_shard_bytes (one may exceed)."""
    groups, size = [[]], 0
    for name, nbytes in sizes.items():
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def tokenizer_files_of(tokenizer) -> dict:
    """{file name: content} of a tokenizer that can write itself (tokenizer.json), else {} (save_hf_dir's input)."""
    files = getattr(tokenizer, "to_files", None)
    return files() if callable(files) else {}


def _write_tokenizer_files(tmp: str, tokenizer_files: Optional[TokenizerFiles]) -> None:
    if not tokenizer_files:
        return
    if isinstance(tokenizer_files, Mapping):
        for name, content in tokenizer_files.items():
            mode, enc = ("wb", None) if isinstance(content, bytes) else ("w", "utf-8")
            with open(os.path.join(tmp, os.path.basename(name)), mode, encoding=enc) as f:
                f.write(content)
        return
    for src in tokenizer_files:
        if not os.path.isfile(src):
            raise UserError(f"tokenizer file {src} does not exist; pass existing tokenizer files")
        shutil.copyfile(src, os.path.join(tmp, os.path.basename(src)))


def _write_model(tmp: str, cfg: ModelConfig, params: Params, max_shard_bytes: int) -> None:
    from safetensors.numpy import save_file

    sources = hf_names.hf_sources(cfg, params)  # each shard's tensors are made (transposed) just before writing
    dtype = str(next(iter(sources.values()))[0].dtype)
    config = hf_names.config_to_hf(cfg, dtype=_DTYPE_NAMES.get(dtype, cfg.param_dtype))
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    generation = {k: v for k, v in (("bos_token_id", cfg.bos_id), ("eos_token_id", cfg.eos_id)) if v is not None}
    with open(os.path.join(tmp, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation, f, indent=2)
    sizes = {name: int(w.nbytes) for name, (w, _) in sources.items()}
    groups = _shards(sizes, max_shard_bytes)
    if len(groups) == 1:
        save_file({n: hf_names.hf_tensor(s) for n, s in sources.items()}, os.path.join(tmp, SINGLE),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for k, names in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: hf_names.hf_tensor(sources[n]) for n in names}, os.path.join(tmp, fname),
                  metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
    index = {"metadata": {"total_size": int(sum(sizes.values()))}, "weight_map": weight_map}
    with open(os.path.join(tmp, INDEX), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def _same_files(new: str, old: str) -> bool:
    """Whether directory old holds exactly new's file names with the same bytes."""
    import filecmp

    if not os.path.isdir(old) or sorted(os.listdir(new)) != sorted(os.listdir(old)):
        return False
    names = os.listdir(new)
    if not all(os.path.isfile(os.path.join(d, n)) for d in (new, old) for n in names):
        return False
    return all(filecmp.cmp(os.path.join(new, n), os.path.join(old, n), shallow=False) for n in names)


def save_hf_dir(path: str, cfg: ModelConfig, params: Params, tokenizer_files: Optional[TokenizerFiles] = None,
                max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> None:
    """Writes config.json, generation_config.json, safetensors (+ index when sharded) and tokenizer files.

    tokenizer_files: {file name: content} or paths to copy. Refuses a non-empty existing path unless overwrite.
    An existing directory whose files are byte-identical to what would be written is left untouched (its files'
    modification times too): a resumed run that exports the same model again does not make it look new to what
    fingerprints the directory (task compare's rows of an extra model).
    """
    try:
        check_params(cfg, params)
    except ValueError as e:
        raise UserError(f"cannot save to {path}: {e}") from None
    if max_shard_bytes <= 0:
        raise UserError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    path = os.path.abspath(path)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise UserError(f"{path} exists and is not a directory; choose another output path")
        if os.listdir(path) and not overwrite:
            raise UserError(f"{path} already exists and is not empty; choose another path or pass overwrite=True")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    moved = None  # where the old directory waits until the new one is in place
    try:
        _write_model(tmp, cfg, params, max_shard_bytes)
        _write_tokenizer_files(tmp, tokenizer_files)
        for name in os.listdir(tmp):  # safetensors and mkdtemp create private files; make them like the rest
            os.chmod(os.path.join(tmp, name), 0o644)
        os.chmod(tmp, 0o755)
        if _same_files(tmp, path):
            shutil.rmtree(tmp)
            return
        if os.path.exists(path):
            moved = os.path.join(tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent), "model")
            os.rename(path, moved)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved is not None and not os.path.exists(path):
            os.rename(moved, path)
            shutil.rmtree(os.path.dirname(moved), ignore_errors=True)
        raise
    if moved is not None:
        shutil.rmtree(os.path.dirname(moved))
