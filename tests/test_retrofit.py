"""Task retrofit end to end on the tiny model: the DMC retrofit and the DMS main job (configs/smollm2_main.py),
their model directories, and the side-by-side step (the trained model through its serving cache next to H2O and TOVA at the CR it reached, decoded
through the caches on the same held-out text, one compare run directory); bad side-by-side options."""

from __future__ import annotations

import json
import os

import pytest

from dmc_jax.main import main
from tests.test_data_helpers import data_config, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DMC = os.path.join(ROOT, "configs", "smollm2_dmc.py")
MAIN = os.path.join(ROOT, "configs", "smollm2_main.py")


def _common(tmp_path, out):
    """The tiny model, a tiny corpus and held-out text, a few steps and small evaluation windows."""
    corpus = write_corpus(tmp_path / "corpus", num_files=3, paragraphs_per_file=30)
    data = data_config(tmp_path, corpus)
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(" ".join(f"Line {i} of a held-out text that nobody trained on." for i in range(80)))
    fields = [f"--config.data.{k}={v}" for k, v in data.items() if k in
              ("source", "data_dir", "cache_dir", "min_document_chars", "validation_fraction", "seq_len",
               "batch_size", "shuffle_window", "num_threads", "progress")]
    return ["--config.model.source=tiny", "--config.model.max_seq_len=256", f"--config.output_dir={out}", *fields,
            "--config.train.steps=4", "--config.train.progress=False", "--config.train.tensorboard=False",
            "--config.checkpoint.every_steps=2", f"--config.eval.text_files={heldout}", "--config.eval.window=64",
            "--config.eval.stride=64", "--config.eval.max_tokens=1024", "--config.generate.max_new_tokens=8",
            "--config.retrofit.side_by_side_sequences=2"]


def _argv(tmp_path, out, *extra):
    """The DMC main job on the tiny model: a few steps, and a decision offset that makes it merge about every other
    token (the pool, sized for a target of 1.5, holds what it keeps; the eviction budgets stay above
    compare.min_budget)."""
    return [DMC, *_common(tmp_path, out), "--config.dmc.zero_out_steps=1", "--config.dmc.retrofit_steps=2",
            "--config.dmc.window=4", "--config.optim.hold_steps=2", "--config.retrofit.control=False",
            "--config.dmc.decision_offset=0.0", "--config.dmc.target_cr=1.5", *extra]


def test_the_dmc_retrofit_puts_the_trained_model_next_to_h2o_and_tova_at_the_cr_it_reached(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", *_argv(tmp_path, out)]) == 0
    results = json.load(open(out / "results.json"))["results"]
    assert os.path.exists(out / "dmc" / "model" / "kv_method.json")
    side = results["side_by_side"]
    rows = {(r["model"], r["method"], r["ratio"]): r for r in side["rows"]}
    dense = next(r for r in side["rows"] if r["method"] == "dense")
    trained = next(r for r in side["rows"] if r["method"] == "dmc_paged")
    trained_cr = trained["logical_cr"]
    assert side["trained_cr"] == trained_cr and trained_cr > 1.0
    # the eviction rows run at the trained model's measured CR, not at the target, and again at the CR of its
    # bytes (dense bytes / its bytes) where that differs by more than 1%: the same tokens, then the same memory
    bytes_cr = dense["bytes_per_seq"] / trained["bytes_per_seq"]
    assert side["trained_bytes_cr"] == pytest.approx(bytes_cr)
    # the tiny DMC pool (target 1.5 x margin 1.25 in pages of 16 for 64 tokens) allocates more than the dense cache:
    # no eviction row at its memory, and the report says so (the DMS main job below has the row at its bytes)
    assert bytes_cr < 1.0 and "more bytes than the dense cache" in side["bytes_note"]
    ratios = {round(trained_cr, 2)}
    assert set(rows) == {("base", "dense", dense["ratio"]), ("dmc", "dmc_paged", trained["ratio"])} | {
        ("base", m, r) for m in ("h2o", "tova") for r in ratios}, rows.keys()
    for m in ("h2o", "tova"):
        for ratio in ratios:
            r = rows[("base", m, ratio)]
            assert r["budget"] == -(-64 // ratio)
            assert abs(r["logical_cr"] - 64 / r["budget"]) < 1e-6
    assert dense["logical_cr"] == 1.0
    for r in rows.values():
        assert r["ppl"] > 1.0 and r["bytes_per_seq"] > 0
    assert rows[("base", "h2o", round(trained_cr, 2))]["bytes_per_seq"] < dense["bytes_per_seq"]
    report = open(out / "report.md").read()
    assert "Side by side at the trained model's CR" in report and "| base | h2o |" in report
    assert "more bytes than the dense cache" in report
    assert os.path.exists(out / "side_by_side" / "compare.md")
    # run again: every row (training and side by side) is reused, nothing is measured twice
    capsys.readouterr()
    assert main(["--config", *_argv(tmp_path, out)]) == 0
    out_text = capsys.readouterr().out
    assert "[compare] base h2o CR" not in out_text and "[compare] base tova CR" not in out_text, out_text
    assert f"base|h2o|{round(trained_cr, 2):g}: measured in the earlier run, reused" in out_text
    again = json.load(open(out / "results.json"))["results"]["side_by_side"]
    assert [r["ppl"] for r in again["rows"]] == [r["ppl"] for r in side["rows"]]


def test_the_main_job_retrofits_dms_and_measures_it_next_to_h2o_and_tova_at_its_cr_and_at_its_bytes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [MAIN, *_common(tmp_path, out), "--config.model.compute_dtype=float32", "--config.dms.decision_channel=-1",
            "--config.dms.window=4", "--config.dms.ramp_steps=2", "--config.dms.decision_offset=0.0",
            "--config.retrofit.side_by_side_evals=('ppl',)", "--config.cache.dms_paged.target_cr=2.0"]
    assert main(["--config", *argv]) == 0
    results = json.load(open(out / "results.json"))["results"]
    assert results["method"] == "dms" and "control" not in results
    assert os.path.exists(out / "dms" / "model" / "kv_method.json")
    assert results["dms"]["generation"]["cache"] == "dms_paged"  # the sample runs in the serving cache configured
    # the serving threshold chosen on training text fills the pool from below and is what the model directory serves
    cal = results["dms"]["calibration"]
    assert cal["rows"] >= 1 and cal["tokens"] == 64
    assert cal["kept_per_head"] <= cal["target_kept"] < cal["slots_per_head"]
    recorded = json.load(open(out / "dms" / "model" / "kv_method.json"))["cache"]
    assert recorded["threshold"] == cal["threshold"] != 0.0 and recorded["prompt"] == "query"
    # the directory served with other settings says so (main prints it after loading the model), with the flags
    # that serve it as recorded; served as recorded, nothing to say
    from dmc_jax.cache import model_method
    from dmc_jax.config_loader import parse_argv

    serve = ["--config", os.path.join(ROOT, "configs", "smollm2.py"), f"--config.model.source={out / 'dms' / 'model'}"]
    note = model_method.serving_note(parse_argv(serve))
    assert note.startswith("note: ") and "kv_method.json records threshold" in note and "prompt query" in note
    flags = note.split("to serve as recorded pass ")[1].split()
    assert model_method.serving_note(parse_argv(serve + flags)) is None
    assert model_method.serving_note(parse_argv(serve + ["--config.cache.method=tova"])) is None
    side = results["side_by_side"]
    trained = next(r for r in side["rows"] if r["method"] == "dms_paged")
    dense = next(r for r in side["rows"] if r["method"] == "dense")
    cr, bytes_cr = trained["logical_cr"], dense["bytes_per_seq"] / trained["bytes_per_seq"]
    assert cr > 1.0 and side["trained_bytes_cr"] == pytest.approx(bytes_cr)
    ratios = sorted({round(cr, 2), round(bytes_cr, 2)})
    assert len(ratios) == 2, (cr, bytes_cr)  # a pool sized for CR 2 is not what the model keeps
    assert sorted((r["method"], r["ratio"]) for r in side["rows"] if r["method"] in ("h2o", "tova")) == sorted(
        (m, r) for m in ("h2o", "tova") for r in ratios)
    report = open(out / "report.md").read()
    assert "dms_paged cache during generation" in report
    assert "(dense bytes / the trained model's bytes: the same memory)" in report
    # resumed with more steps: the retrained model's row is measured again (the dense row is reused)
    capsys.readouterr()
    assert main(["--config", *argv, "--config.train.steps=6"]) == 0
    out_text = capsys.readouterr().out
    assert "base|dense|1: measured in the earlier run, reused" in out_text
    assert "[compare] dms dms_paged CR" in out_text  # measured, not reused (its second pass reuses this run's row)
    again = json.load(open(out / "results.json"))["results"]
    assert again["dms"]["tokens_trained"] > results["dms"]["tokens_trained"]


@pytest.mark.parametrize("override,message", [
    ("--config.retrofit.side_by_side=('h2o','magic')", "'magic' is not a cache method"),
    ("--config.retrofit.side_by_side=('corm',)", "'corm' is not a budgeted training-free method"),
    ("--config.retrofit.side_by_side_evals=('mc',)", "retrofit.side_by_side_evals must be"),
    ("--config.retrofit.calibrate_threshold=True", "retrofit.calibrate_threshold chooses the serving threshold"),
])
def test_bad_side_by_side_options_are_one_line_errors(tmp_path, capsys, override, message):
    out = tmp_path / "run"
    assert main(["--config", DMC, "--config.model.source=tiny", f"--config.output_dir={out}", override]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not os.path.exists(out / "dmc")
