"""Task compare's summary: a trained model's row goes under the CR it measured, not the one it was trained for."""

from dmc_jax.evaluation import compare_report


def _row(model, method, ratio, ppl, cr, passkey=None):
    return {"model": model, "method": method, "ratio": ratio, "ppl": ppl, "logical_cr": cr, "passkey_acc": passkey,
            "bytes_per_seq": 2 ** 20}


def test_a_thresholded_trained_row_is_reported_at_its_measured_cr():
    rows = [_row("base", "dense", 1.0, 29.1, 1.0, 0.4),
            _row("base", "h2o", 4.0, 29.8, 4.0, 0.33), _row("base", "h2o", 8.0, 31.2, 8.0, 0.04),
            # one model trained for CR 8 (its nominal ratio), served at three thresholds
            _row("dms@t+1", "dms_paged", 8.0, 29.3, 4.41, 0.38),
            _row("dms@t-1.5", "dms_paged", 8.0, 29.6, 8.74, 0.21),
            _row("dms nothing evicted", "dms", 8.0, 28.4, 1.0, 1.0),
            _row("dms@t+6", "dms_paged", 8.0, 28.9, 2.5, 0.5)]
    text = compare_report.winners(rows)
    lines = {line.split(":")[0]: line for line in text.splitlines()}
    assert set(lines) == {"- CR 2.5", "- CR 4", "- CR 8"}, text  # 2.5 is no grid ratio: its own column
    assert "lowest perplexity dms@t+1 (dms_paged) (29.30; next 29.80)" in lines["- CR 4"]
    assert "lowest perplexity dms@t-1.5 (dms_paged) (29.60; next 31.20)" in lines["- CR 8"]
    assert "nothing evicted" not in text  # CR 1: next to the dense row, never a winner
    table = compare_report.summary_table(rows)
    assert table.splitlines()[0] == "| method | CR 1 | CR 2.5 | CR 4 | CR 8 |"
    control = next(line for line in table.splitlines() if "nothing evicted" in line)
    assert control.split("|")[2].strip().startswith("28.40")  # the CR 1 column
    # an eviction row stays at its nominal CR whatever it measured (its budget is the nominal one)
    assert compare_report._column(_row("base", "h2o", 4.0, 30.0, 3.9), [1.0, 4.0, 8.0]) == 4.0
