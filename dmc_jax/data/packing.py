"""Packing: a stream of tokenized documents -> rows of exactly T tokens, with segment ids and positions.

Concat-then-split: documents are laid end to end and cut every T tokens, so no token is dropped or repeated and a
long document continues in the next row. Within a row, `segment_ids_T` numbers the document pieces 1, 2, ...
(0 = padding, only in the last row of a finite stream) and `positions_T` restarts at 0 for each piece, so a model
that masks attention to equal segment ids sees each document alone. With `reset=False` every real token is
segment 1 and positions run 0..T-1 (plain concatenation; documents are then only separated by eos).

Resumable in O(1): the state at the start of a row is (the parent's state before the document being read, how many
of its tokens are used). Restoring re-reads that one document; nothing is replayed. The state is plain JSON.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np


class PackedRows(grain.IterDataset):
    """Rows {'tokens', 'segment_ids', 'positions'} (int32 [T]) packed from parent documents {'tokens': int32 [N]}."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, reset: bool = True):
        super().__init__(parent)
        self._seq_len = seq_len
        self._reset = reset

    def __iter__(self) -> grain.DatasetIterator:
        return _PackedRowsIterator(self._parent.__iter__(), self._seq_len, self._reset)

    def __str__(self) -> str:
        return f"PackedRows(seq_len={self._seq_len}, reset={self._reset})"


class _PackedRowsIterator(grain.DatasetIterator):
    """Iterator of PackedRows; the current document is kept with the parent state from before it was read."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, reset: bool):
        super().__init__(parent)
        self._seq_len = seq_len
        self._reset = reset
        self._doc_T: np.ndarray | None = None
        self._doc_state: Any = None
        self._offset = 0
        self._exhausted = False

    def _next_document(self) -> bool:
        """Reads the next document into self._doc_T; False at the end of the parent."""
        self._doc_state = copy.deepcopy(self._parent.get_state())
        try:
            self._doc_T = np.asarray(next(self._parent)["tokens"], dtype=np.int32)
        except StopIteration:
            self._doc_T, self._exhausted = None, True
            return False
        self._offset = 0
        return True

    def __next__(self) -> dict:
        T = self._seq_len
        tokens_T = np.zeros(T, np.int32)
        segment_ids_T = np.zeros(T, np.int32)
        positions_T = np.zeros(T, np.int32)
        filled, segment = 0, 0
        while filled < T:
            if self._doc_T is None or self._offset >= len(self._doc_T):
                if self._exhausted or not self._next_document():
                    break
                continue
            take = min(len(self._doc_T) - self._offset, T - filled)
            tokens_T[filled:filled + take] = self._doc_T[self._offset:self._offset + take]
            segment = segment + 1 if self._reset else 1
            segment_ids_T[filled:filled + take] = segment
            start = 0 if self._reset else filled
            positions_T[filled:filled + take] = np.arange(start, start + take, dtype=np.int32)
            filled += take
            self._offset += take
        if filled == 0:
            raise StopIteration
        return {"tokens": tokens_T, "segment_ids": segment_ids_T, "positions": positions_T}

    def get_state(self) -> dict:
        if self._doc_T is not None and self._offset < len(self._doc_T):
            return {"parent": copy.deepcopy(self._doc_state), "offset": int(self._offset)}
        return {"parent": copy.deepcopy(self._parent.get_state()), "offset": 0}

    def set_state(self, state: dict) -> None:
        self._parent.set_state(copy.deepcopy(state["parent"]))
        self._doc_T, self._doc_state, self._offset, self._exhausted = None, None, 0, False
        if state["offset"] > 0:
            if not self._next_document():
                raise ValueError(f"cannot restore the packing state {state}: the parent ended early")
            self._offset = int(state["offset"])


def next_token_targets(tokens_BT, segment_ids_BT):
    """(targets_BT, weights_BT): token t+1 is the target of t only inside one segment; the last column weighs 0.

    With reset on, the eos that ends a document is still a target, but the first token of the next document is
    not (the model cannot see the document before it). Accepts numpy or jax arrays, returns jax arrays.
    """
    tokens_BT, segment_ids_BT = jnp.asarray(tokens_BT), jnp.asarray(segment_ids_BT)
    targets_BT = jnp.pad(tokens_BT[:, 1:], ((0, 0), (0, 1)))
    same_BT = (segment_ids_BT[:, 1:] == segment_ids_BT[:, :-1]) & (segment_ids_BT[:, 1:] > 0)
    weights_BT = jnp.pad(same_BT.astype(jnp.float32), ((0, 0), (0, 1)))
    return targets_BT, weights_BT


def target_weights(batch: dict):
    """(targets_BT, weights_BT) of next_token_targets, each target token weighed by batch['loss_weights'] [B, T]
    where the batch has them (recall rows with data.recall_weight > 1): position t's weight is its target's (t+1)."""
    targets_BT, weights_BT = next_token_targets(batch["tokens"], batch["segment_ids"])
    if "loss_weights" in batch:
        per_token_BT = jnp.asarray(batch["loss_weights"], jnp.float32)
        weights_BT = weights_BT * jnp.pad(per_token_BT[:, 1:], ((0, 0), (0, 1)))
    return targets_BT, weights_BT
