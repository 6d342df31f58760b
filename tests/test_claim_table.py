"""benchmarks/claim_table.py: the claim (learned beats every training-free method on both measures) read from
compare's rows files; a loss on either measure, against any method, makes the cell's verdict no."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "claim_table.py"


def _pk(found, n=4):
    return {"passkey": [{"length": 64, "depth": 0.5, "accuracy": found / n, "answers": ["x"] * n}]}


def _write(path, rows):
    path.write_text(json.dumps({"settings": {}, "rows": rows}))
    return str(path)


def _run(spec_path, *extra):
    return subprocess.run([sys.executable, str(SCRIPT), "--spec", str(spec_path), *extra],
                          capture_output=True, text=True, timeout=120)


def _spec(tmp_path, learned_ppl, learned_found, snapkv_ppl=True):
    ppl = _write(tmp_path / "ppl.json", [
        {"model": "base", "method": "dense", "ratio": 1.0, "ppl": 10.0, "bytes_per_seq": 8e6, "logical_cr": 1.0},
        {"model": "base", "method": "h2o", "ratio": 4.0, "ppl": 12.0, "bytes_per_seq": 2 ** 21, "logical_cr": 4.0},
        {"model": "base", "method": "h2o", "ratio": 8.0, "ppl": 15.0, "bytes_per_seq": 1e6, "logical_cr": 8.0},
        {"model": "base", "method": "tova", "ratio": 4.0, "ppl": 13.0, "bytes_per_seq": 2e6, "logical_cr": 4.0},
        *([{"model": "base", "method": "snapkv", "ratio": 4.0, "ppl": 20.0}] if snapkv_ppl else []),
        {"model": "dms", "method": "dms_paged", "ratio": 8.0, "ppl": learned_ppl, "bytes_per_seq": 2e6,
         "logical_cr": 4.1}])
    seeds = [f"{s}:" + _write(tmp_path / f"pk{s}.json", [
        {"model": "base", "method": "dense", "ratio": 1.0, **_pk(3)},
        {"model": "base", "method": "h2o", "ratio": 4.0, **_pk(2)},
        {"model": "base", "method": "h2o", "ratio": 8.0, **_pk(0)},
        {"model": "base", "method": "tova", "ratio": 4.0, **_pk(1 + s)},
        {"model": "dms", "method": "dms_paged", "ratio": 8.0, **_pk(learned_found[s])}]) for s in (0, 1)]
    # a second file of prompt set 0 (a later run beside the first) adds a method's row, not set 0's dense again
    seeds.append("0:" + _write(tmp_path / "pk0b.json", [
        {"model": "base", "method": "dense", "ratio": 1.0, **_pk(3)},
        {"model": "base", "method": "snapkv", "ratio": 4.0, **_pk(0)}]))
    spec = tmp_path / "cells.json"
    spec.write_text(json.dumps([{"cell": "T, CR 4", "ratio": 4.0, "learned": "dms", "ppl": [ppl],
                                 "passkey": seeds, "methods": ["h2o", "tova", "snapkv"]}]))
    return spec


def test_a_cell_is_won_only_when_both_measures_beat_every_method(tmp_path):
    out = tmp_path / "t.json"
    res = _run(_spec(tmp_path, 11.5, [3, 3]), "--json", str(out))
    assert res.returncode == 0, res.stderr
    cell = json.loads(out.read_text())[0]
    rows = {r["name"]: r for r in cell["rows"]}
    assert rows["h2o"]["ppl"] == 12.0 and rows["h2o"]["mb"] == 2.0  # the CR-4 row, not the CR-8 one
    assert (rows["tova"]["passkey_found"], rows["tova"]["passkey_prompts"]) == (3, 8)  # 1 + 2, summed over sets
    assert (rows["learned"]["passkey_found"], rows["learned"]["passkey_prompts"]) == (6, 8)
    assert (rows["dense"]["passkey_found"], rows["dense"]["passkey_prompts"]) == (6, 8)  # set 0 counted once
    assert rows["snapkv"]["passkey_prompts"] == 4 and rows["snapkv"]["ppl"] == 20.0
    assert cell["beats_every_method"] is True and cell["not_measured"] == []

    # a measure missing for one method: not shown, so not won
    res = _run(_spec(tmp_path, 11.5, [3, 3], snapkv_ppl=False), "--json", str(out))
    cell = json.loads(out.read_text())[0]
    assert cell["beats"]["snapkv"] == {"ppl": None, "passkey": True}
    assert cell["beats_every_method"] is False and cell["not_measured"] == ["snapkv ppl"]

    # worse perplexity than H2O: not won, though passkey is
    res = _run(_spec(tmp_path, 12.5, [3, 3]), "--json", str(out))
    cell = json.loads(out.read_text())[0]
    assert {k: cell["beats"]["h2o"][k] for k in ("ppl", "passkey")} == {"ppl": False, "passkey": True}
    assert cell["beats"]["h2o"]["bytes_ratio"] == 2e6 / 2 ** 21 and cell["beats_every_method"] is False
    # passkey is compared on the prompt sets both rows have: 4 of 8 overall, but 0 of set 0's 4 (SnapKV's only set)
    _run(_spec(tmp_path, 11.5, [0, 4]), "--json", str(out))
    cell = json.loads(out.read_text())[0]
    assert cell["beats"]["snapkv"]["passkey"] is False and cell["beats"]["tova"]["passkey"] is True  # 4 of 8 > 3
    # a passkey tie with TOVA (3 of 8) is not a win
    res = _run(_spec(tmp_path, 11.5, [2, 1]), "--json", str(out))
    cell = json.loads(out.read_text())[0]
    assert cell["beats"]["tova"]["passkey"] is False and cell["beats_every_method"] is False
    assert "**no**" in res.stdout


def test_a_missing_rows_file_is_one_line_and_exit_2(tmp_path):
    spec = _spec(tmp_path, 11.5, [3, 3])
    (tmp_path / "pk1.json").unlink()
    res = _run(spec)
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "pk1.json" in res.stderr and "rows.json" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"cell": "x"}]))
    res = _run(bad)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "lacks ratio, learned, ppl, passkey, methods" in res.stderr


def test_paired_checks_every_prompt_against_the_keys_its_seed_drew(tmp_path):
    """--paired rebuilds each set's keys (the real SmolLM2 tokenizer and filler, as task compare) and sign-tests."""
    from dmc_jax.evaluation.passkey import draw_keys
    from dmc_jax.tasks.compare import passkey_filler
    from dmc_jax.weights.load import load_model

    filler_len = len(passkey_filler(load_model("smollm2").tokenizer))
    keys = {s: [k for _, k, _ in draw_keys(filler_len, (64,), (0.5,), 6, s)[64]] for s in (0, 3)}

    def row(model, method, ratio, right):  # `right`: which of the 6 prompts it answers with the key
        ans = {s: [f" {k}" if i in right else " 0" for i, k in enumerate(keys[s])] for s in keys}
        return lambda s: {"model": model, "method": method, "ratio": ratio, "passkey": [
            {"length": 64, "depth": 0.5, "accuracy": len(right) / 6, "answers": ans[s]}]}

    rows = [row("base", "dense", 1.0, {0, 1, 2}), row("base", "tova", 4.0, {0, 1}), row("dms", "x", 8.0, {0, 2, 3, 4})]
    files = [f"{s}:" + _write(tmp_path / f"pk{s}.json", [r(s) for r in rows]) for s in (0, 3)]
    spec = tmp_path / "cells.json"
    spec.write_text(json.dumps([{"cell": "c", "ratio": 4.0, "learned": "dms", "ppl": [], "passkey": files,
                                 "methods": ["tova"]}]))
    out = tmp_path / "t.json"
    res = _run(spec, "--paired", "smollm2", "--json", str(out))
    assert res.returncode == 0, res.stderr
    paired = json.loads(out.read_text())[0]["beats"]["tova"]["paired"]
    assert paired == {"seeds": [0, 3], "only_this": 6, "only_baseline": 2, "p_two_sided": 0.2890625}
    # the files named with the wrong prompt set: the keys do not match the stored accuracies
    spec.write_text(spec.read_text().replace('"0:', '"1:'))
    res = _run(spec, "--paired", "smollm2")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "do not match seed 1" in res.stderr
