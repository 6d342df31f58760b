"""The command line: overrides, validation, and one-line errors with exit code 2 for bad input."""

import json
import os
import subprocess
import sys

import pytest

from dmc_jax.config_loader import parse_argv
from dmc_jax.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "smollm2.py")


def _error_line(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


def test_overrides_are_typed():
    c = parse_argv(["--config", CONFIG, "--config.generate.max_new_tokens=7", "--config.generate.chat", "false",
                    "--config.generate.top_p=0.5", "--config.bench.batch_sizes=(2,4)", "--config.task=eval"])
    assert c.generate.max_new_tokens == 7 and c.generate.chat is False and c.generate.top_p == 0.5
    assert c.bench.batch_sizes == (2, 4) and c.task == "eval"


@pytest.mark.parametrize("argv, needle", [
    (["--config", "configs/nope.py"], "config file 'configs/nope.py' not found"),
    ([], "no config given"),
    (["--config", CONFIG, "--config.generate.max_new_tokns=3"], "did you mean generate.max_new_tokens"),
    (["--config", CONFIG, "--config.generate.max_new_tokens=many"], "expects a int"),
    (["--config", CONFIG, "--config.generate.max_new_tokens=0"], "generate.max_new_tokens must be >= 1"),
    (["--config", CONFIG, "--config.task=train_everything"], "task must be one of"),
    (["--config", CONFIG, "--config.model.compute_dtype=float8"], "model.compute_dtype must be one of"),
    (["--config", CONFIG, "--config.generate.top_p=1.5"], "generate.top_p must be in (0, 1]"),
    (["--config", CONFIG, "--config.eval.stride=4096"], "eval.stride must be in"),
    (["--config", CONFIG, "--config.cache.method=magic"], "cache.method must be one of"),
    (["--config", CONFIG, "--config.model.source=/nonexistent/model.gguf", "--config.task=generate"], "not found"),
])
def test_bad_input_is_one_line_exit_2(capsys, tmp_path, argv, needle):
    argv = [a.replace("TMP", str(tmp_path)) for a in argv]
    err = _error_line(capsys, argv + [f"--config.output_dir={tmp_path}/run"])
    assert needle in err, err


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dmc_jax.main", "--config", CONFIG, "--config.nope=1"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert "unknown config key 'nope'" in proc.stderr


@pytest.mark.slow
def test_generate_with_smollm2_writes_results(capsys, tmp_path):
    out = tmp_path / "gen"
    assert main(["--config", CONFIG, "--config.task=generate", f"--config.output_dir={out}",
                 "--config.generate.prompt=What is the capital of France?",
                 "--config.generate.max_new_tokens=12"]) == 0
    printed = capsys.readouterr().out
    path = printed.strip().splitlines()[-1].removeprefix("results: ")
    results = json.load(open(path))["results"]
    sample = results["samples"][0]
    assert "Paris" in sample["completion"]
    assert 1 <= len(sample["completion_ids"]) <= 12


@pytest.mark.slow
@pytest.mark.parametrize("argv, needle", [
    (["--config.generate.prompt= "], "generate.prompt is empty"),
    (["--config.generate.prompt=" + "word " * 300, "--config.model.max_seq_len=128"], "exceeds model.max_seq_len"),
    (["--config.model.max_seq_len=100000"], "exceeds the model's context length"),
])
def test_bad_prompts_with_smollm2(capsys, tmp_path, argv, needle):
    err = _error_line(capsys, ["--config", CONFIG, "--config.task=generate", f"--config.output_dir={tmp_path}"]
                      + argv)
    assert needle in err, err
