"""Reliability of training runs: a flipped bit in any file of a checkpoint is found (and the run falls back to the
newest intact one, keeping the damaged one aside), a SIGKILL at any point of the save / eval sequence leaves
metrics.jsonl and results.json as an uninterrupted run's, and Ctrl-C stops with one line and exit code 130."""

from __future__ import annotations

import json
import os
import pathlib
import random
import subprocess
import sys

import jax
import numpy as np
import pytest

from dmc_jax.data import pipeline
from dmc_jax.data.prepare import prepare
from dmc_jax.errors import UserError
from dmc_jax.main import main
from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer
from dmc_jax.training import checksums, loop
from dmc_jax.training.checkpoint import DAMAGED, Checkpointer
from dmc_jax.training.objective import LanguageModelObjective
from tests.test_data_helpers import data_config, write_corpus
from tests.test_training import CFG, ROOT, _final_state, _write_config, make_config, tiny_model

TIMING = ("tokens_per_second", "step_time_s")  # wall-clock fields differ between any two runs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    cfg = data_config(tmp, write_corpus(tmp / "corpus", num_files=3, paragraphs_per_file=30))
    prepare(cfg, ByteTokenizer())
    return tmp, cfg


def _train(config, data):
    return loop.train(config, tiny_model(), LanguageModelObjective(CFG),
                      loop.TrainData(pipeline.make_iterator(data, ByteTokenizer())))


def _flip_bit(path: pathlib.Path, rng: random.Random) -> tuple[int, int]:
    raw = bytearray(path.read_bytes())
    offset, bit = rng.randrange(len(raw)), rng.randrange(8)
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))
    return offset, bit


def test_a_flipped_bit_in_any_checkpoint_file_is_found_and_the_run_falls_back(corpus, tmp_path):
    _, data = corpus
    rng = random.Random(0)
    config = make_config(data, tmp_path / "run", **{"train.steps": 4, "checkpoint.max_to_keep": 0})
    _train(config, data)
    step4 = tmp_path / "run" / "checkpoints" / "4"
    files = sorted(p for item in checksums.ITEMS for p in (step4 / item).rglob("*") if p.is_file())
    assert len([p for p in files if p.parts[-3:-1] == ("ocdbt.process_0", "d")]) >= 2  # the array data files
    with Checkpointer(str(step4.parent)) as ckpt:
        assert ckpt.damage(4) is None and ckpt.damage(2) is None
        for path in files:  # every file of state/ (arrays), data/ (iterator position) and meta/
            original = path.read_bytes()
            _flip_bit(path, rng)
            problem = ckpt.damage(4)
            assert problem == f"{path.relative_to(step4)}: checksum differs", (path, problem)
            path.write_bytes(original)
        assert ckpt.damage(4) is None

    # One flipped bit in the largest array file: resuming moves step 4 aside and continues from step 2, exactly.
    biggest = max(files, key=lambda p: p.stat().st_size)
    _flip_bit(biggest, rng)
    damaged_bytes = biggest.read_bytes()
    config.train.steps = 6
    summary = _train(config, data)
    assert summary["resumed_from"] == 2 and summary["last_checkpoint"] == 6
    kept = tmp_path / "run" / "checkpoints" / DAMAGED / "4" / biggest.relative_to(step4)
    assert kept.read_bytes() == damaged_bytes  # set aside, never deleted
    whole = make_config(data, tmp_path / "whole", **{"train.steps": 6})
    _train(whole, data)
    a, b = _final_state(tmp_path / "whole" / "checkpoints", 6), _final_state(tmp_path / "run" / "checkpoints", 6)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # No intact checkpoint left: one line naming each damaged step, nothing moved.
    ckpt_dir = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        _flip_bit(max((ckpt_dir / str(step) / "state").rglob("*"), key=lambda p: p.stat().st_size if p.is_file()
                      else 0), rng)
    before = sorted(str(p) for p in ckpt_dir.rglob("*"))
    config.train.steps = 8
    with pytest.raises(UserError) as err:
        _train(config, data)
    message = str(err.value)
    assert "\n" not in message and "no intact checkpoint" in message and "step 2:" in message, message
    assert sorted(str(p) for p in ckpt_dir.rglob("*")) == before


def _kill_run(path: str, out: pathlib.Path, kill_at: str):
    env = dict(os.environ, KILL_AT=kill_at)
    proc = subprocess.run([sys.executable, "-m", "tests.kill_runner", "--config", path, f"--config.output_dir={out}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, (kill_at, proc.returncode, proc.stderr[-3000:])


def _rows(out: pathlib.Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in open(out / "metrics.jsonl")]


def test_sigkill_at_every_point_of_save_and_eval_leaves_the_files_of_an_uninterrupted_run(corpus, tmp_path):
    """Steps 1..8: logs every 4, checkpoints and evaluations every 2; one run killed four times, then resumed. (A
    kill while a save is still being written ends like 'seal': no commit.)"""
    _, data = corpus
    config = make_config(data, tmp_path / "unused", **{"train.steps": 8, "train.log_every": 4,
                                                       "train.eval_every": 2, "train.eval_batches": 2,
                                                       "checkpoint.every_steps": 2, "checkpoint.max_to_keep": 0})
    path = _write_config(tmp_path / "tiny_train.py", config)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = subprocess.Popen([sys.executable, "-m", "dmc_jax.main", "--config", path,
                                  f"--config.output_dir={whole}"], cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    try:
        _kill_run(path, broken, "seal:2")  # the first checkpoint never committed: the next run starts over
        assert not [p for p in (broken / "checkpoints").iterdir() if p.name.isdigit()]
        _kill_run(path, broken, "committed:4")  # step 4 committed, its evaluation not run
        assert max(int(p.name) for p in (broken / "checkpoints").iterdir() if p.name.isdigit()) == 4
        assert not [r for r in _rows(broken) if r["step"] == 4 and "eval/loss" in r]
        _kill_run(path, broken, "evaluated:6")  # the evaluation row of step 6 written
        _kill_run(path, broken, "finished")  # every step done, results.json not yet written
        assert not (broken / "results.json").exists()
        assert main(["--config", path, f"--config.output_dir={broken}"]) == 0  # resumes the finished run
        _, err = reference.communicate(timeout=240)
        assert reference.returncode == 0, err[-3000:]
    finally:
        reference.kill()
    assert _rows(broken) == _rows(whole)
    assert [(r["step"], "eval/loss" in r) for r in _rows(whole)] == [(2, True), (4, False), (4, True), (6, True),
                                                                     (8, False), (8, True)]
    a, b = (json.load(open(out / "results.json"))["results"] for out in (whole, broken))
    for key in ("final_loss", "final_eval", "last_checkpoint", "steps"):
        assert a[key] == b[key], key
    assert a["final_loss"] is not None and a["final_eval"]["eval/loss"] > 0
    for x, y in zip(*(jax.tree.leaves(_final_state(out / "checkpoints", 8)) for out in (whole, broken))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_and_exit_130(corpus, tmp_path, capsys, monkeypatch):
    _, data = corpus
    config = make_config(data, tmp_path / "unused", **{"train.steps": 10})
    path = _write_config(tmp_path / "tiny_train.py", config)
    step = loop.Trainer._step

    def interrupted_at_4(self, i, on_step):
        if i == 4:
            raise KeyboardInterrupt
        return step(self, i, on_step)

    monkeypatch.setattr(loop.Trainer, "_step", interrupted_at_4)
    assert main(["--config", path, f"--config.output_dir={tmp_path / 'run'}"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("interrupted during training step 5 of 10; the last checkpoint is step 4 in "), err
    assert "run the same command again to resume" in err, err

    monkeypatch.setattr("dmc_jax.tasks.common.load_model", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["--config", path, f"--config.output_dir={tmp_path / 'run2'}"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted before the task finished") and "\n" not in err, err
