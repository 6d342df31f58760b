"""The grain input pipeline: documents of a prepared split -> shuffled, sharded, tokenized, packed batches.

    documents (TFDS array_record, random access)
      -> shuffle documents with data.seed (a new permutation each epoch: seed + epoch)
      -> this process's documents: positions process_index, process_index + P, ... of each epoch's permutation
      -> repeat data.num_epochs times (0 = forever)
      -> tokenize (data.num_threads threads, in order)       {'tokens': int32 [N]}
      -> pack into rows of data.seq_len (packing.py)         {'tokens', 'segment_ids', 'positions'}: int32 [T]
      -> training split with data.recall_fraction > 0: facts spliced into some rows (recall.py)
      -> shuffle rows within windows of data.shuffle_window
      -> batch data.batch_size / P rows; a finite run pads its last batch with all-zero rows (segment id 0)

Every step is deterministic given (seed, process index, process count), so the same config gives the same
batches, and each epoch's documents are split between processes with no overlap and nothing left out. The
iterator's state (`get_state()`, small JSON) goes into the training checkpoint (checkpointing.py); a restored
iterator continues with exactly the next batch. Processes share out documents, not tokens, so in a finite run
(num_epochs > 0) they may yield slightly different numbers of batches; training repeats forever (num_epochs=0)
and stops after a number of steps.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import grain

from dmc_jax.data import sources
from dmc_jax.data.options import validate
from dmc_jax.data.packing import PackedRows
from dmc_jax.data.recall import RecallInserter
from dmc_jax.data.tokenize import DocumentTokens
from dmc_jax.errors import UserError


def process_shard(shard: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """(index, count) of this process: the given pair (tests simulating processes) or jax's."""
    if shard is None:
        import jax
        return jax.process_index(), jax.process_count()
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise UserError(f"process shard must be (index, count) with 0 <= index < count, got {shard!r}")
    return index, count


def make_dataset(cfg_data, tokenizer, *, split: Optional[str] = None, shard: Optional[tuple[int, int]] = None,
                 shuffle: Optional[bool] = None, num_epochs: Optional[int] = None,
                 source: Optional[Sequence] = None) -> grain.IterDataset:
    """Batches for this process: dicts of 'tokens', 'segment_ids', 'positions', each int32 [B, T].

    split defaults to data.train_split; shuffle and num_epochs to data.shuffle / data.num_epochs (0 = forever).
    source: an already opened random-access source of documents (instead of opening split).
    """
    validate(cfg_data)
    index, count = process_shard(shard)
    if cfg_data.batch_size % count:
        raise UserError(f"data.batch_size={cfg_data.batch_size} must be a multiple of the number of processes "
                        f"({count})")
    batch = cfg_data.batch_size // count
    split = split or cfg_data.train_split
    shuffle = cfg_data.shuffle if shuffle is None else shuffle
    num_epochs = cfg_data.num_epochs if num_epochs is None else num_epochs
    source = source if source is not None else sources.open_split(cfg_data, split)

    documents = grain.MapDataset.source(source)
    if shuffle:
        documents = documents.shuffle(seed=cfg_data.seed)
    documents = documents[index::count]
    doc_tokens = DocumentTokens(tokenizer, cfg_data.add_bos, cfg_data.add_eos, cfg_data.text_key)
    _check_enough_tokens(documents, doc_tokens, cfg_data.seq_len, split, index, count)
    documents = documents.repeat(num_epochs or None).map(doc_tokens)

    read = grain.ReadOptions(num_threads=cfg_data.num_threads,
                             prefetch_buffer_size=cfg_data.prefetch if cfg_data.num_threads else 0)
    rows = PackedRows(documents.to_iter_dataset(read), cfg_data.seq_len, cfg_data.reset_attention)
    if cfg_data.recall_fraction > 0 and split == cfg_data.train_split:
        recall = RecallInserter(tokenizer, cfg_data.recall_fraction, cfg_data.recall_facts,
                                span=cfg_data.get("recall_span", 0.5), weight=cfg_data.get("recall_weight", 1.0))
        rows = rows.random_map(recall, seed=cfg_data.seed)
    if shuffle and cfg_data.shuffle_window > 1:
        rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=cfg_data.shuffle_window,
                                                           seed=cfg_data.seed)
    pad_last = functools.partial(grain.experimental.batch_and_pad, batch_size=batch)
    return rows.batch(batch, batch_fn=pad_last)


def make_iterator(cfg_data, tokenizer, **kwargs) -> grain.DatasetIterator:
    """iter(make_dataset(...)): a checkpointable iterator of batches (see make_dataset for the arguments)."""
    return iter(make_dataset(cfg_data, tokenizer, **kwargs))


def make_eval_dataset(cfg_data, tokenizer, *, shard: Optional[tuple[int, int]] = None) -> grain.IterDataset:
    """One unshuffled pass over data.eval_split (held out from training), last batch padded."""
    return make_dataset(cfg_data, tokenizer, split=cfg_data.eval_split, shard=shard, shuffle=False, num_epochs=1)


def _check_enough_tokens(documents: grain.MapDataset, doc_tokens: DocumentTokens, seq_len: int, split: str,
                         index: int, count: int) -> None:
    """UserError unless this process's share of one epoch fills at least one row (reads only what it needs)."""
    who = f" for process {index} of {count}" if count > 1 else ""
    if len(documents) == 0:
        raise UserError(f"split {split!r} has no documents{who}; add text or use fewer processes")
    total = 0
    for i in range(len(documents)):
        total += len(doc_tokens(documents[i])["tokens"])
        if total >= seq_len:
            return
    raise UserError(f"split {split!r} has {total} tokens{who}, fewer than one sequence (data.seq_len={seq_len}); "
                    f"add text or lower data.seq_len")

