"""The bad-input catalogue: every kind of bad input a user can give is one line on stderr ('error: ...', naming the
field or file and what to do) and exit code 2, never a traceback. In-process calls of main on the tiny model; each
case takes well under a second but the few that load the tiny model.

Classes: config file and override parsing (tuple elements, ':ARG' variants), field validation, input files
(prompts, evaluation text), a model directory's method file (kv_method.json, or dmc_config.json
of older directories), output locations (checked before any
work), training data."""

from __future__ import annotations

import json
import os
import pathlib

import pytest

from dmc_jax.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOLLM2, TRAIN, DMC, LLAMA2 = (os.path.join(ROOT, "configs", f"{n}.py")
                               for n in ("smollm2", "smollm2_train", "smollm2_dmc", "llama2_7b_dmc"))
TINY = "--config.model.source=tiny --config.model.max_seq_len=256"  # the random tiny model (256 positions)
GEN = "--config.task=generate"
EVAL = "--config.task=eval --config.eval.window=128 --config.eval.stride=64"


def _files(tmp: pathlib.Path) -> None:
    """The bad files the catalogue points at (TMP/... in the cases)."""
    (tmp / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp / "binary.txt").write_bytes(b"hello\x00world\n")
    (tmp / "blank.txt").write_text("\n  \n")
    (tmp / "a_dir").mkdir()
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "broken_config.py").write_text("def get_config(:\n")
    for name, content in {"types": {"window": "12"}, "bool": {"control": 1}, "range": {"target_cr": 0.5},
                          "unknown": {"windw": 12}, "list": [1, 2], "json": "{'window': 12", "utf8": b"\xff\xfe{}"
                          }.items():
        model = tmp / f"model_{name}"
        model.mkdir()
        data = content if isinstance(content, bytes) else (content if isinstance(content, str)
                                                            else json.dumps(content)).encode()
        (model / "dmc_config.json").write_bytes(data)
    for name, content in {"name": {"method": 3}, "unknown": {"method": "magic"},
                          "hparams": {"method": "dmc_paged", "hparams": {"window": 1.5}}}.items():
        model = tmp / f"kv_method_{name}"
        model.mkdir()
        (model / "kv_method.json").write_text(json.dumps(content))


CASES = {
    # config file and overrides
    "config missing": ([SMOLLM2.replace("smollm2", "nope")], "not found"),
    "config broken": (["TMP/broken_config.py"], "failed to load: SyntaxError"),
    "no config": ([], "no config given"),
    "unknown key": ([SMOLLM2, "--config.generate.max_new_tokns=3"], "did you mean generate.max_new_tokens"),
    "int expected": ([SMOLLM2, "--config.generate.max_new_tokens=many"], "expects a int"),
    "bool expected": ([SMOLLM2, "--config.generate.chat=maybe"], "expects true or false"),
    "not a literal": ([SMOLLM2, "--config.bench.batch_sizes=x y"], "expects a Python literal"),
    "tuple of strings in ints": ([SMOLLM2, "--config.bench.batch_sizes=('a','b')"],
                                 "--config.bench.batch_sizes expects a tuple of numbers like (1, 8), got 'a'"),
    "tuple of ints in strings": ([SMOLLM2, "--config.compare.methods=(1, 2)"],
                                 "--config.compare.methods expects a tuple of strings"),
    "tuple of strings in rules": ([TRAIN, "--config.mesh.rules=('batch', 'data')"],
                                  "--config.mesh.rules expects a tuple of tuples"),
    "fraction in batch sizes": ([SMOLLM2, "--config.task=bench", "--config.bench.batch_sizes=(1, 2.5)"],
                                "bench.batch_sizes must be a non-empty tuple of positive ints"),
    "bad :ARG variant": ([LLAMA2 + ":cr9"], "get_config('cr9') in"),
    ":ARG to a plain config": ([TRAIN + ":cr2"], "does not take an argument"),
    ":ARG not a variant": ([SMOLLM2 + ":cr2"], "configs/smollm2.py variant must be 'fp32' or 'auto', got 'cr2'"),
    "section set as value": ([SMOLLM2, "--config.generate=1"], "is a section"),
    # field validation
    "unknown task": ([SMOLLM2, "--config.task=train_everything"], "task must be one of"),
    "top_p out of range": ([SMOLLM2, "--config.generate.top_p=1.5"], "generate.top_p must be in (0, 1]"),
    "unknown cache method": ([SMOLLM2, "--config.cache.method=magic"], "cache.method must be one of"),
    "bad schedule": ([TRAIN, "--config.optim.schedule=step"], "optim.schedule must be one of"),
    "missing model file": ([SMOLLM2, "--config.model.source=/nonexistent/model.gguf", "--config.task=generate"],
                           "not found"),
    # input files
    "prompts not UTF-8": ([SMOLLM2, TINY, GEN, "--config.generate.prompts_file=TMP/latin1.txt"],
                          "generate.prompts_file 'TMP/latin1.txt' is not UTF-8 text (bad byte at offset 3)"),
    "prompts binary": ([SMOLLM2, TINY, GEN, "--config.generate.prompts_file=TMP/binary.txt"], "looks binary"),
    "prompts missing": ([SMOLLM2, TINY, GEN, "--config.generate.prompts_file=TMP/none.txt"], "not found"),
    "prompts a directory": ([SMOLLM2, TINY, GEN, "--config.generate.prompts_file=TMP/a_dir"], "is a directory"),
    "prompts blank": ([SMOLLM2, TINY, GEN, "--config.generate.prompts_file=TMP/blank.txt"], "has no prompts"),
    "empty prompt": ([SMOLLM2, TINY, GEN, "--config.generate.prompt= "], "generate.prompt is empty"),
    "eval text missing": ([SMOLLM2, TINY, EVAL, "--config.eval.text_files=TMP/none.txt"],
                          "not found"),
    "eval text not UTF-8": ([SMOLLM2, TINY, EVAL, "--config.eval.text_files=TMP/latin1.txt"],
                            "is not UTF-8 text"),
    # the method file of a model directory: blamed on the file and its field, never on a config field
    "method file wrong type": ([SMOLLM2, "--config.model.source=TMP/model_types"],
                               "TMP/model_types/dmc_config.json: field 'window' must be int like 12, got '12'"),
    "method file int for bool": ([SMOLLM2, "--config.model.source=TMP/model_bool"],
                                 "dmc_config.json: field 'control' must be true/false"),
    "method file bad value": ([SMOLLM2, "--config.model.source=TMP/model_range"],
                              "dmc_config.json holds a bad value: dmc.target_cr must be >= 1; got 0.5 (saved with "
                              "the model, not set by you)"),
    "method file unknown field": ([SMOLLM2, "--config.model.source=TMP/model_unknown"], "(windw)"),
    "method file not an object": ([SMOLLM2, "--config.model.source=TMP/model_list"], "must hold a JSON object"),
    "method file not JSON": ([SMOLLM2, "--config.model.source=TMP/model_json"], "is not valid JSON"),
    "method file not UTF-8": ([SMOLLM2, "--config.model.source=TMP/model_utf8"], "is not UTF-8 text"),
    "kv_method.json method not a name": ([SMOLLM2, "--config.model.source=TMP/kv_method_name"],
                                         "kv_method.json: 'method' must be a cache method name; got 3"),
    "kv_method.json unknown method": ([SMOLLM2, "--config.model.source=TMP/kv_method_unknown"],
                                      "names cache method 'magic', which this installation does not have"),
    "kv_method.json wrong type": ([SMOLLM2, "--config.model.source=TMP/kv_method_hparams"],
                                  "kv_method.json: field 'window' must be int like 12, got 1.5"),
    # output locations, checked before any work
    "output_dir under a file": ([SMOLLM2, "--config.output_dir=TMP/a_file/run"], "output directory"),
    "output_dir is a file": ([SMOLLM2, "--config.output_dir=TMP/a_file"], "output directory"),
    "checkpoint dir under a file": ([TRAIN, TINY, "--config.checkpoint.dir=TMP/a_file/ckpt"],
                                    "cannot write to checkpoint.dir TMP/a_file/ckpt"),
    "export dir under a file": ([TRAIN, TINY, "--config.train.export_dir=TMP/a_file/model"],
                                "the directory of train.export_dir TMP/a_file exists and is not a directory; set "
                                "train.export_dir to a directory"),
    "export dir is a file": ([TRAIN, TINY, "--config.train.export_dir=TMP/a_file"],
                             "train.export_dir TMP/a_file exists and is not a directory"),
    "retrofit output is a file": ([DMC, TINY, EVAL, "--config.task=retrofit", "--config.output_dir=TMP/retrofit"],
                                  "the retrofit output TMP/retrofit/dmc/checkpoints exists and is not a directory"),
    # training data
    "training data missing": ([TRAIN, TINY, "--config.data.source=TMP/none", "--config.data.data_dir=TMP/tfds"],
                              "data.source directory 'TMP/none' does not exist"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_and_exit_2(name, tmp_path, capsys):
    _files(tmp_path)
    if name == "retrofit output is a file":
        (tmp_path / "retrofit" / "dmc").mkdir(parents=True)
        (tmp_path / "retrofit" / "dmc" / "checkpoints").write_text("in the way\n")
    args, needle = CASES[name]
    argv = ["--config"] + args if args else []
    argv = [a.replace("TMP", str(tmp_path)) for arg in argv for a in (arg.split() if arg in (TINY, EVAL) else [arg])]
    if not any(a.startswith("--config.output_dir=") for a in argv):
        argv.append(f"--config.output_dir={tmp_path / 'run'}")
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert needle.replace("TMP", str(tmp_path)) in err, err


@pytest.mark.parametrize("field, value", [("num_hidden_layers", "x"), ("rms_norm_eps", None),
                                          ("num_attention_heads", 0), ("hidden_size", [64])])
def test_a_model_config_json_with_a_wrong_type_is_one_line(field, value):
    from dmc_jax.errors import UserError
    from dmc_jax.weights.hf_names import config_from_hf

    d = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
         "num_hidden_layers": 2, "num_attention_heads": 4, field: value}
    with pytest.raises(UserError, match="config.json has a field of the wrong type") as err:
        config_from_hf(d)
    assert "\n" not in str(err.value)
