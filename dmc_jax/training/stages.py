"""Staged training (train.stages): one run whose later steps change some options, e.g. a recipe that trains on
short rows, then on long rows, then with another window.

    train.stages = ("250", "350 data.seq_len=2048 data.batch_size=1", "390 dms.window=64")

Stage i trains steps (until[i-1], until[i]] with the config plus the overrides of stages 0..i (they accumulate:
the third stage above still trains on 2,048-token rows). Each stage is a run of its own in <output_dir>/stage<i>
(metrics.jsonl, checkpoints/): it resumes from its own newest checkpoint, else starts from the previous stage's
last checkpoint (checkpoint.init_from semantics: parameters, optimizer state, RNG and step continue, the data
iterator starts afresh with the stage's data options), and the first stage from checkpoint.init_from if set. So
the staged run resumes like any run: the same command again. train.steps must be the last stage's step;
train.export_dir receives the last stage's parameters.

A value is a Python literal (2048, 0.95, 'text', (1, 2)) or else taken as a string; a key must name a field of
the config. Keys the stages themselves decide (output_dir, train.steps, train.stages, train.export_dir,
checkpoint.dir, checkpoint.init_from) cannot be overridden.
"""

from __future__ import annotations

import ast
import dataclasses
import os

import ml_collections

from dmc_jax.errors import UserError

RESERVED = ("output_dir", "train.steps", "train.stages", "train.export_dir", "checkpoint.dir", "checkpoint.init_from")


@dataclasses.dataclass(frozen=True)
class Stage:
    until: int                       # the stage's last step (inclusive)
    overrides: tuple                 # ((dotted key, value), ...) of this stage alone


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _has(config: ml_collections.ConfigDict, key: str) -> bool:
    node = config
    for part in key.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False
        node = node[part]
    return True


def parse(config: ml_collections.ConfigDict) -> list[Stage]:
    """The stages of config.train.stages ([] when there are none); UserError naming the first bad one."""
    specs = config.train.get("stages", ())
    if isinstance(specs, str) or not isinstance(specs, (tuple, list)):
        raise UserError(f"train.stages must be a tuple of strings 'UNTIL_STEP key=value ...', e.g. "
                        f"('250', '350 data.seq_len=2048'); got {specs!r}")
    stages, last = [], 0
    for i, spec in enumerate(specs):
        words = str(spec).split()
        if not words or not words[0].isdigit():
            raise UserError(f"train.stages[{i}]={spec!r} must start with the stage's last step, e.g. "
                            f"'350 data.seq_len=2048'")
        until = int(words[0])
        if until <= last:
            raise UserError(f"train.stages[{i}] ends at step {until}, not after the previous stage's {last}; list "
                            f"the stages in order of their last step")
        overrides = []
        for word in words[1:]:
            key, eq, text = word.partition("=")
            if not eq or not key:
                raise UserError(f"train.stages[{i}]: {word!r} is not key=value (no spaces around '=')")
            if key in RESERVED:
                raise UserError(f"train.stages[{i}]: {key} is set by the stages themselves; remove it from the stage")
            if not _has(config, key):
                raise UserError(f"train.stages[{i}]: the config has no field {key}; check the name (e.g. "
                                f"data.seq_len)")
            overrides.append((key, _value(text)))
        stages.append(Stage(until, tuple(overrides)))
        last = until
    if stages and config.checkpoint.get("dir", ""):
        raise UserError(f"checkpoint.dir={config.checkpoint.dir!r} cannot be combined with train.stages (each stage "
                        f"keeps its checkpoints in <output_dir>/stage<i>/checkpoints); set checkpoint.dir=''")
    if stages and config.train.steps != last:
        raise UserError(f"train.steps={config.train.steps} but train.stages ends at step {last}; set "
                        f"train.steps={last} or change the last stage")
    return stages


def stage_dir(output_dir: str, i: int) -> str:
    return os.path.join(output_dir, f"stage{i}")


def stage_config(config: ml_collections.ConfigDict, stages: list[Stage], i: int) -> ml_collections.ConfigDict:
    """The config stage i runs with: the overrides of stages 0..i applied, its own directory, its steps, and where
    it starts when it has no checkpoint of its own."""
    sub = config.copy_and_resolve_references()  # e.g. export_dir = output_dir + '/model' stays the run's
    with sub.unlocked():
        for stage in stages[:i + 1]:
            for key, value in stage.overrides:
                *path, leaf = key.split(".")
                node = sub
                for part in path:
                    node = node[part]
                try:
                    node[leaf] = value
                except (TypeError, ValueError) as e:
                    raise UserError(f"train.stages: {key}={value!r} does not fit the field ({e}); give a value of "
                                    f"the field's type") from None
        sub.output_dir = stage_dir(config.output_dir, i)
        sub.checkpoint.dir = ""
        sub.train.steps = stages[i].until
        sub.train.stages = ()
        if i > 0:
            sub.checkpoint.init_from = os.path.join(stage_dir(config.output_dir, i - 1), "checkpoints",
                                                    str(stages[i - 1].until))
        if i < len(stages) - 1:
            sub.train.export_dir = ""
    return sub
