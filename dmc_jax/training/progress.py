"""The logging window: each step's host metrics, checked as they arrive, averaged into one log row every log_every.

    window = Window()                 # or Window.from_state(saved) on resume: the steps since the last log row
    window.add(step, host, tokens)    # raises Diverged(step, name, value) for a loss / grad_norm that is not finite
    row = window.row()                # mean (weight summed) + tokens_per_second, step_time_s; the window empties
    saved = window.state()            # JSON, kept in each checkpoint so a resumed run logs exactly the same rows

Step time is wall time between consecutive add() calls; pause() excludes logging, saving and evaluating.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Optional

import numpy as np

from dmc_jax.training.objective import WEIGHT


class Diverged(Exception):
    """A step's loss or gradient norm is not finite (the loop turns it into a one-line TrainingDiverged)."""

    def __init__(self, step: int, name: str, host: dict):
        super().__init__(step, name)
        self.step, self.name, self.host = step, name, host


def _mean_window(rows: list[dict]) -> dict:
    """Host metrics of several steps -> their mean (WEIGHT summed)."""
    out = {}
    for name in rows[0]:
        values = np.stack([np.asarray(m[name], np.float64) for m in rows])
        out[name] = values.sum(0) if name == WEIGHT else values.mean(0)
    return out


class Window:
    """Host metrics of the steps since the last log row, their tokens and seconds; all step times for the median."""

    def __init__(self, rows: Optional[list] = None, tokens: int = 0, seconds: float = 0.0):
        self.rows, self.tokens, self.seconds = list(rows or []), int(tokens), float(seconds)
        self.step_times: list[float] = []
        self._clock = time.perf_counter()

    @classmethod
    def from_state(cls, state: Optional[dict]) -> "Window":
        return cls() if not state else cls(state["rows"], state["tokens"], state["seconds"])

    def state(self) -> dict:
        return {"rows": [{k: np.asarray(v).tolist() for k, v in r.items()} for r in self.rows],
                "tokens": self.tokens, "seconds": self.seconds}

    def add(self, step: int, host: dict, tokens: int) -> None:
        now = time.perf_counter()
        self.step_times.append(now - self._clock)
        self.seconds += now - self._clock
        self._clock = now
        for name in ("loss", "grad_norm"):
            if not math.isfinite(float(host[name])):
                raise Diverged(step, name, host)
        self.rows.append(host)
        self.tokens += tokens

    def pause(self) -> None:
        """What happened since the last add() (logging, saving, evaluating) is not step time."""
        self._clock = time.perf_counter()

    def row(self) -> dict:
        out = _mean_window(self.rows)
        out.update(tokens_per_second=self.tokens / max(self.seconds, 1e-9),
                   step_time_s=self.seconds / len(self.rows))
        self.rows, self.tokens, self.seconds = [], 0, 0.0
        return out

    def median_step_time(self) -> Optional[float]:
        timed = self.step_times[1:] or self.step_times  # the first includes compilation
        return statistics.median(timed) if timed else None
