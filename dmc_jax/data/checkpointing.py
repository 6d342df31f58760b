"""The data iterator in the training checkpoint: orbax args for grain's own checkpoint handler.

Use them as one item of the `ocp.args.Composite` that also holds params, optimizer state, step and RNG, so one
CheckpointManager step saves (and restores) everything together:

    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params), data=save_args(iterator)))
    restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract_params),
                                                           data=restore_args(iterator)))
    iterator = restored["data"]   # the same object, now positioned at the next batch

grain's handler writes one small JSON file per process (`process_<i>-of-<n>.json`), so each process restores its
own shard's position; restoring needs the same process count.
"""

from __future__ import annotations

import grain

ITEM = "data"  # the conventional name of the iterator's item in the Composite


def save_args(iterator: grain.DatasetIterator):
    """orbax CheckpointArgs that save the iterator's state (a grain.checkpoint.CheckpointSave)."""
    return grain.checkpoint.CheckpointSave(iterator)


def restore_args(iterator: grain.DatasetIterator):
    """orbax CheckpointArgs that restore into iterator, a fresh iterator of the same pipeline."""
    return grain.checkpoint.CheckpointRestore(iterator)
