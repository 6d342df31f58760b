"""Training checkpoints: one orbax CheckpointManager step holds everything a run needs to continue exactly.

    <dir>/<step>/state   params, optimizer state, base RNG key (StandardSave: sharded arrays, restored in place)
    <dir>/<step>/data    the grain iterator's position (dmc_jax/data/checkpointing.py), one JSON per process
    <dir>/<step>/meta    {'step', 'fingerprint', 'log'}: the shapes and data options the run was started with, and
                         the run's bookkeeping at that step (the loop's partial logging window)
    <dir>/<step>/checksums.json   SHA-256 of every file of state/, data/ and meta/ (checksums.py)

Saves are asynchronous (arrays are copied to host before save() returns, then written in the background) and
atomic: orbax writes into a temporary directory and renames it to <step> when complete, so a killed run leaves
either a finished step or a temporary directory, which is ignored (and cleaned up by the next run). The checksums
are written into the temporary directory after every file is written and before the rename, so they describe
exactly what was committed. The last checkpoint.max_to_keep steps are kept.

restore_latest() verifies checksums newest first: a damaged step (a file changed, missing or added) is moved to
<dir>/damaged/<step> (never deleted) with a one-line note, and the newest intact step is restored; if no step is
intact nothing is moved and the run stops with a one-line UserError. A checkpoint that cannot be read, or that was
written by a run with a different fingerprint, is a one-line UserError.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from dmc_jax.data import checkpointing as data_ckpt
from dmc_jax.errors import UserError
from dmc_jax.training import checksums

DAMAGED = "damaged"  # <dir>/damaged/<step>: checkpoints whose files no longer match their checksums

_WHAT_TO_DO = ("move that step directory out of {dir} to resume from an earlier one, or set output_dir (or "
               "checkpoint.dir) to a new directory")


def _first_line(e: Exception) -> str:
    """The first line of e's message, its middle left out when long (the cause, e.g. 'No space left', is last)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return line if len(line) <= 240 else f"{line[:110]} ... {line[-120:]}"


class _QuietOrbaxErrors(logging.Filter):
    """Drops orbax's ERROR log records (with tracebacks) of a failed background save: the failure reaches the
    Checkpointer, which reports it in one line; and its warnings that a directory opened read-only (init_from) is
    read-only."""

    def filter(self, record: logging.LogRecord) -> bool:
        orbax = f"{os.sep}orbax{os.sep}" in record.pathname
        read_only_notice = orbax and "read only" in record.getMessage().replace("read_only", "read only")
        return not (orbax and (record.levelno >= logging.ERROR or read_only_notice))


logging.getLogger("absl").addFilter(_QuietOrbaxErrors())


def fingerprint_diffs(stored: dict, now: dict, ignore_prefix: str = "") -> list[str]:
    """'key: <stored> there, <now> now' for every fingerprint entry that differs (keys with ignore_prefix skipped)."""
    return [f"{k}: {stored.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(stored) | set(now))
            if not (ignore_prefix and k.startswith(ignore_prefix)) and stored.get(k) != now.get(k)]


@dataclasses.dataclass
class Restored:
    """What restore_latest() found: the step, its arrays, the iterator positioned after it, the loop's log state."""

    step: int
    state: Any
    iterator: Any
    log: Optional[dict]


class Checkpointer:
    """Saves and restores (state, data iterator, meta) at integer steps in one directory, checksummed."""

    def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = True, read_only: bool = False):
        """read_only: another run's directory (checkpoint.init_from): nothing is created, cleaned or deleted."""
        self.directory = os.path.abspath(directory)
        self._async = async_save
        self._saving: Optional[int] = None  # the step whose save is in flight (sealed by _seal)
        # Always orbax's async checkpointer: only it runs a callback between the last write and the commit (a
        # synchronous save simply waits for it).
        options = ocp.CheckpointManagerOptions(max_to_keep=None if read_only else (max_to_keep or None),
                                               create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=True, cleanup_tmp_directories=not read_only,
                                               async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
        try:
            self._mngr = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # unreadable directory, bad permissions, ...
            raise UserError(f"cannot open the checkpoint directory {self.directory} ({type(e).__name__}: "
                            f"{_first_line(e)}); fix it or set output_dir (or checkpoint.dir) elsewhere") from None

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def _seal(self) -> None:
        """orbax's post-finalization callback: every file of the step is written, the rename to <step> is next."""
        if self._saving is None or jax.process_index() != 0:
            return
        tmp = [os.path.join(self.directory, n) for n in os.listdir(self.directory)
               if n.startswith(f"{self._saving}.orbax-checkpoint-tmp")]
        checksums.write(tmp[0] if len(tmp) == 1 else self._step_dir(self._saving))  # no tmp: a rename-free store

    def latest_step(self) -> Optional[int]:
        """The newest finished step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._mngr.all_steps())

    def save(self, step: int, state: Any, iterator, fingerprint: dict, log: Optional[dict] = None) -> None:
        """Starts saving state (a pytree of arrays), the iterator's position and log (JSON: the loop's bookkeeping)
        as `step`; returns once the arrays are on the host (the write goes on in the background)."""
        self.wait()  # the previous save is sealed before _saving moves on
        self._saving = int(step)
        try:
            self._mngr.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=data_ckpt.save_args(iterator),
                meta=ocp.args.JsonSave({"step": int(step), "fingerprint": fingerprint, "log": log})), force=True)
        except Exception as e:
            raise self._failed(e) from None
        if not self._async:
            self.wait()

    def _failed(self, e: Exception) -> UserError:
        return UserError(f"saving checkpoint step {self._saving} in {self.directory} failed ({type(e).__name__}: "
                         f"{_first_line(e)}); the checkpoints before it are intact: free space or fix the directory, "
                         f"then run the same command to resume")

    def damage(self, step: int) -> Optional[str]:
        """None if step's files match the checksums written when it was committed, else what differs. A step
        written without checksums (by an older version) counts as intact."""
        where = self._step_dir(step)
        return checksums.verify(where) if checksums.has_checksums(where) else None

    def _check(self, step: int) -> None:
        problem = self.damage(step)
        if problem is not None:
            raise UserError(f"checkpoint {self._step_dir(step)} is corrupt ({problem}; its files changed after "
                            f"they were written): " + _WHAT_TO_DO.format(dir=self.directory))

    def _set_aside(self, step: int) -> str:
        dest = os.path.join(self.directory, DAMAGED, str(step))
        if os.path.exists(dest):
            dest += time.strftime("-%Y%m%d-%H%M%S")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        os.rename(self._step_dir(step), dest)
        return dest

    def _newest_intact(self) -> Optional[int]:
        """Process 0: the newest intact step, moving damaged newer ones aside (-1: none is intact)."""
        steps = self.all_steps()
        found = {s: self.damage(s) for s in reversed(steps)}
        intact = [s for s in reversed(steps) if found[s] is None]
        if not intact:
            problems = "; ".join(f"step {s}: {found[s]}" for s in reversed(steps))
            raise UserError(f"no intact checkpoint in {self.directory}, every one is corrupt ({problems}); restore "
                            f"them from a backup, or set output_dir (or checkpoint.dir) to a new directory")
        for s in reversed(steps):
            if s == intact[0]:
                break
            dest = self._set_aside(s)
            print(f"checkpoint step {s} is damaged ({found[s]}); moved to {dest}; resuming from step {intact[0]}",
                  flush=True)
        return intact[0]

    def restore_latest(self, abstract_state: Any, iterator, fingerprint: dict) -> Optional[Restored]:
        """The newest intact checkpoint (damaged newer ones moved aside), or None if the directory holds none."""
        if self.latest_step() is None:
            return None
        if jax.process_count() == 1:
            step = self._newest_intact()
        else:  # process 0 checks and moves; every process restores the step it chose
            from dmc_jax.training import distributed

            choice = None
            if jax.process_index() == 0:
                try:
                    choice = json.dumps({"step": self._newest_intact()})
                except UserError as e:
                    choice = json.dumps({"error": str(e)})
            choice = json.loads(distributed.share_from_main("restore-step", choice))
            if "error" in choice:
                raise UserError(choice["error"] if jax.process_index() == 0 else
                                f"no intact checkpoint in {self.directory} (process 0: {choice['error']})")
            step = choice["step"]
        self._mngr.reload()  # steps moved aside are gone from its list
        state, iterator, meta = self._restore(step, abstract_state, iterator, fingerprint)
        return Restored(step, state, iterator, meta.get("log"))

    def restore(self, step: int, abstract_state: Any, iterator, fingerprint: dict) -> tuple[Any, Any]:
        """(state, iterator) of `step`: arrays placed as the ShapeDtypeStructs in abstract_state say, iterator
        positioned at the next batch. UserError if the checkpoint is damaged, unreadable or its fingerprint
        differs."""
        self._check(step)
        state, iterator, _ = self._restore(step, abstract_state, iterator, fingerprint)
        return state, iterator

    def _restore(self, step: int, abstract_state: Any, iterator, fingerprint: dict) -> tuple[Any, Any, dict]:
        where = self._step_dir(step)
        meta = self._meta(step)
        diffs = fingerprint_diffs(dict(meta["fingerprint"]), fingerprint)
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
        return restored["state"], restored[data_ckpt.ITEM], dict(meta)

    def _meta(self, step: int) -> dict:
        """The JSON saved with `step`: its fingerprint and the loop's log state."""
        try:
            meta = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            dict(meta["fingerprint"])
            return meta
        except Exception as e:
            raise UserError(f"checkpoint {self._step_dir(step)} cannot be read ({type(e).__name__}: "
                            f"{_first_line(e)}); it is incomplete or corrupt: "
                            + _WHAT_TO_DO.format(dir=self.directory)) from None

    def stored_fingerprint(self, step: int) -> dict:
        """The fingerprint saved with `step` (what the run that wrote it had: parameter shapes, data options...)."""
        return dict(self._meta(step)["fingerprint"])

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """Only the arrays {'params', 'opt_state', 'rng'} of `step` (evaluation, export): no iterator needed."""
        where = self._step_dir(step)
        self._check(step)
        try:
            restored = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(
                abstract_state)))
        except Exception as e:
            raise UserError(f"checkpoint {where} cannot be restored ({type(e).__name__}: {_first_line(e)}); it is "
                            f"incomplete or corrupt: " + _WHAT_TO_DO.format(dir=self.directory)) from None
        return restored["state"]

    def wait(self) -> None:
        """Blocks until every started save is written (UserError if writing it failed: a full disk, ...)."""
        try:
            self._mngr.wait_until_finished()
        except Exception as e:
            raise self._failed(e) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._mngr.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
