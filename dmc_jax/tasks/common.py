"""What every task shares: loading the configured model, the run directory, and the results JSON."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os

import jax
import ml_collections
import numpy as np

from dmc_jax.errors import UserError
from dmc_jax.model.llama import unstack_layers

TINY = "tiny"  # model.source of a random tiny model (tests, smoke runs)


def load_model(config: ml_collections.ConfigDict, layout: str = "inference", require_tokenizer: bool = True):
    """The model of config.model with the config's dtypes and max_seq_len applied, params on the device.

    layout 'inference' gives per-layer weight buffers (llama.unstack_layers: faster prefill and decode);
    'training' keeps the stacked layout that the layer scan and sharding rules expect.
    model.source 'tiny' is a random tiny_config() model with a byte tokenizer (tests and smoke runs).
    """
    from dmc_jax.weights import load_model as load_weights

    loaded = (tiny_model(config.get("seed", 0)) if config.model.source == TINY
              else load_weights(config.model.source, require_tokenizer))
    cfg = loaded.cfg
    max_len = config.model.max_seq_len or cfg.max_seq_len
    if max_len > cfg.max_seq_len:
        raise UserError(f"model.max_seq_len={max_len} exceeds the model's context length {cfg.max_seq_len}; "
                        f"lower model.max_seq_len (0 = the model's own)")
    cfg = cfg.replace(param_dtype=config.model.param_dtype, compute_dtype=config.model.compute_dtype,
                      max_seq_len=max_len, remat=config.model.remat,
                      remat_policy=config.model.get("remat_policy", ""))
    params = jax.tree.map(lambda x: np.asarray(x, cfg.pdtype), loaded.params)
    if layout == "inference":
        params = unstack_layers(params)  # numpy views: no second copy of the weights
    params = jax.device_put(params)
    return dataclasses.replace(loaded, cfg=cfg, params=params)


def tiny_model(seed: int):
    """model.source 'tiny': random tiny_config() weights (seeded by config.seed) and a byte-level tokenizer."""
    from dmc_jax.model.config import tiny_config
    from dmc_jax.model.params import init_params
    from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer
    from dmc_jax.weights import LoadedModel

    tokenizer = ByteTokenizer()
    cfg = tiny_config(vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    params = jax.tree.map(np.asarray, init_params(cfg, jax.random.PRNGKey(seed)))
    return LoadedModel(cfg, params, tokenizer, f"random tiny model (seed {seed})")


def run_dir(config: ml_collections.ConfigDict) -> str:
    """config.output_dir, or runs/<task>-<timestamp>; created if missing."""
    path = config.output_dir or os.path.join(
        "runs", f"{config.task}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create output directory {path}: {e.strerror}; set output_dir to a writable path")
    return path


def output_locations(config: ml_collections.ConfigDict) -> list[tuple[str, str, str]]:
    """(what, directory, the config field that chose it) of everything the task will write, so that main can
    check them before any work."""
    out = [("output_dir", config.output_dir, "output_dir")]
    if config.task == "train":
        ckpt = config.checkpoint.dir or os.path.join(config.output_dir, "checkpoints")
        out.append(("checkpoint.dir", ckpt, "checkpoint.dir" if config.checkpoint.dir else "output_dir"))
        export_dir = config.train.get("export_dir", "")
        if export_dir:  # written atomically: a temporary directory beside it, renamed into place
            if os.path.exists(export_dir) and not os.path.isdir(export_dir):
                raise UserError(f"train.export_dir {export_dir} exists and is not a directory; set train.export_dir "
                                f"to a directory")
            out.append(("the directory of train.export_dir", os.path.dirname(os.path.abspath(export_dir)),
                        "train.export_dir"))
    if config.task == "retrofit":  # <output_dir>/{dmc,control}/checkpoints and the model in <output_dir>/dmc/model
        for name in ("dmc",) + (("control",) if config.retrofit.get("control", False) else ()):
            out.append(("the retrofit output", os.path.join(config.output_dir, name, "checkpoints"), "output_dir"))
    return out


def check_outputs(config: ml_collections.ConfigDict) -> None:
    """Creates every output location of the task and writes a probe file in each: UserError now, not after hours."""
    from dmc_jax.user_files import probe_writable

    for what, path, field in output_locations(config):
        probe_writable(path, what, field)


def _plain(x):
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _plain(np.asarray(x).tolist())
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    return x


def write_results(path: str, results: dict, config: ml_collections.ConfigDict) -> str:
    """Writes results.json (results plus the config that produced them) atomically; returns its path."""
    out = os.path.join(path, "results.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"results": _plain(results), "config": json.loads(config.to_json_best_effort())}, f, indent=2)
    os.replace(tmp, out)
    return out
