"""Training checkpoints: one orbax CheckpointManager step holds everything a run needs to continue exactly.

    <dir>/<step>/state   params, optimizer state, base RNG key (StandardSave: sharded arrays, restored in place)
    <dir>/<step>/data    the grain iterator's position (dmc_jax/data/checkpointing.py), one JSON per process
    <dir>/<step>/meta    {'step', 'fingerprint'}: the shapes and data options the run was started with

Saves are asynchronous (arrays are copied to host before save() returns, then written in the background) and
atomic: orbax writes into a temporary directory and renames it to <step> when complete, so a killed run leaves
either a finished step or a temporary directory, which is ignored (and cleaned up by the next run). The last
checkpoint.max_to_keep steps are kept. A checkpoint that cannot be read, or that was written by a run with a
different fingerprint, is a one-line UserError; nothing already written is ever deleted by a failed restore.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import orbax.checkpoint as ocp

from dmc_jax.data import checkpointing as data_ckpt
from dmc_jax.errors import UserError

_WHAT_TO_DO = ("move that step directory out of {dir} to resume from an earlier one, or set output_dir (or "
               "checkpoint.dir) to a new directory")


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


class Checkpointer:
    """Saves and restores (state, data iterator, meta) at integer steps in one directory."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep or None, create=True,
                                               enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # unreadable directory, bad permissions, ...
            raise UserError(f"cannot open the checkpoint directory {self.directory} ({type(e).__name__}: "
                            f"{_first_line(e)}); fix it or set output_dir (or checkpoint.dir) elsewhere") from None

    def latest_step(self) -> Optional[int]:
        """The newest finished step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._mngr.all_steps())

    def save(self, step: int, state: Any, iterator, fingerprint: dict) -> None:
        """Starts saving state (a pytree of arrays) and the iterator's position as `step`; returns once the
        arrays are on the host (the write goes on in the background)."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=data_ckpt.save_args(iterator),
            meta=ocp.args.JsonSave({"step": int(step), "fingerprint": fingerprint})), force=True)

    def restore(self, step: int, abstract_state: Any, iterator, fingerprint: dict) -> tuple[Any, Any]:
        """(state, iterator) of `step`: arrays placed as the ShapeDtypeStructs in abstract_state say, iterator
        positioned at the next batch. UserError if the checkpoint is unreadable or its fingerprint differs."""
        where = os.path.join(self.directory, str(step))
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            stored = dict(meta["fingerprint"])
        except Exception as e:
            raise UserError(f"checkpoint {where} cannot be read ({type(e).__name__}: {_first_line(e)}); it is "
                            f"incomplete or corrupt: " + _WHAT_TO_DO.format(dir=self.directory)) from None
        diffs = [f"{k}: {stored.get(k)!r} there, {fingerprint.get(k)!r} now" for k in sorted(set(stored) |
                                                                                               set(fingerprint))
                 if stored.get(k) != fingerprint.get(k)]
        if diffs:
            raise UserError(f"checkpoint {where} was written by a different run configuration ({'; '.join(diffs)})"
                            f"; resume with the same model and data options, or set output_dir (or "
                            f"checkpoint.dir) to a new directory")
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=data_ckpt.restore_args(iterator)))
        except Exception as e:
            raise UserError(f"checkpoint {where} cannot be restored ({type(e).__name__}: {_first_line(e)}); it is "
                            f"incomplete or corrupt: " + _WHAT_TO_DO.format(dir=self.directory)) from None
        return restored["state"], restored[data_ckpt.ITEM]

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the arrays {'params', 'opt_state', 'rng'} of `step` (evaluation, export): no iterator needed."""
        where = os.path.join(self.directory, str(step))
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
                abstract_state)))
        except Exception as e:
            raise UserError(f"checkpoint {where} cannot be restored ({type(e).__name__}: {_first_line(e)}); it is "
                            f"incomplete or corrupt: " + _WHAT_TO_DO.format(dir=self.directory)) from None
        return restored["state"]

    def wait(self) -> None:
        """Blocks until every started save is written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
