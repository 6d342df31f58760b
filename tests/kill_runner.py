"""Runs `python -m dmc_jax.main ARGS` in this process and SIGKILLs it at one point of the save / eval sequence
(no test here; tests/test_reliability.py starts it). KILL_AT=point:step, point one of:

    seal       while the checkpoint of `step` is being committed (every file written, not yet renamed into place)
    committed  after the checkpoint of `step` is committed, before its evaluation runs
    evaluated  after the evaluation row of `step` is written
    finished   after training finished, before results.json is written (step ignored)
"""

import os
import signal
import sys

from dmc_jax.main import main
from dmc_jax.training import checkpoint, loop


def die():
    os.kill(os.getpid(), signal.SIGKILL)


def patch(point: str, step: int) -> None:
    T, C = loop.Trainer, checkpoint.Checkpointer
    seal, evaluate, run = C._seal, T._evaluate, T.run

    def sealing(self):
        if self._saving == step:
            die()
        seal(self)

    def evaluating(self, done):
        if point == "committed" and done == step:
            self.ckpt.wait()
            die()
        evaluate(self, done)
        if point == "evaluated" and done == step:
            die()

    def running(self):
        summary = run(self)
        die()
        return summary

    if point == "seal":
        C._seal = sealing
    elif point in ("committed", "evaluated"):
        T._evaluate = evaluating
    elif point == "finished":
        T.run = running
    else:
        raise SystemExit(f"unknown KILL_AT point {point!r}")


if __name__ == "__main__":
    point, _, step = os.environ["KILL_AT"].partition(":")
    patch(point, int(step or 0))
    sys.exit(main(sys.argv[1:]))
