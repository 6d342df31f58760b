"""Training metrics on disk: <run dir>/metrics.jsonl (one JSON object per line) and TensorBoard event files.

Each line is {'step': N, name: value, ...}; arrays (e.g. per layer x head values) are written as nested lists.
Training lines carry the train metrics, evaluation lines names starting with 'eval/'. On resume from step N (0: a
fresh start), lines of later steps (written by the run that died) are dropped first, so the file reads as one run;
the lines kept are in `kept` (the resumed run's final summary and evaluation schedule come from them).
TensorBoard (tensorboardX, no tensorflow): scalars as scalars; an array as its mean plus a histogram.
"""

from __future__ import annotations

import json
import math
import os
from typing import Optional

import numpy as np

FILENAME = "metrics.jsonl"


def _plain(value):
    a = np.asarray(value)
    if a.ndim == 0:
        x = a.item()
        return x if not isinstance(x, float) or math.isfinite(x) else str(x)  # JSON has no nan / inf
    return [_plain(v) for v in a]


class MetricsWriter:
    """Appends metric lines to run_dir/metrics.jsonl (and TensorBoard files in run_dir/tensorboard)."""

    def __init__(self, run_dir: str, tensorboard: bool = True, resume_step: Optional[int] = None):
        self.path = os.path.join(run_dir, FILENAME)
        self.kept: list[dict] = self._truncate_after(resume_step or 0)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazily: only runs that ask for event files need it

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                     purge_step=(resume_step or 0) + 1)

    def _truncate_after(self, step: int) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        keep, rows = [], []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a killed run
                continue
            if row.get("step", 0) <= step:
                keep.append(line if line.endswith("\n") else line + "\n")
                rows.append(row)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, self.path)
        return rows

    def write(self, step: int, metrics: dict) -> None:
        """One line {'step': step, **metrics} (host values: numbers or numpy arrays)."""
        self._file.write(json.dumps({"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}) + "\n")
        self._file.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                a = np.asarray(value, dtype=np.float64)
                if a.ndim == 0:
                    self._tb.add_scalar(name, float(a), step)
                elif a.size:
                    self._tb.add_scalar(f"{name}/mean", float(a.mean()), step)
                    self._tb.add_histogram(name, a, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
