"""The grain pipeline: every token once per epoch across processes, determinism, exact resume, packing."""

from __future__ import annotations

import collections
import json

import grain
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from dmc_jax.data import pipeline, sources
from dmc_jax.data.packing import PackedRows, next_token_targets
from dmc_jax.data.prepare import prepare
from dmc_jax.errors import UserError
from tests.test_data_helpers import ByteTokenizer, data_config, write_corpus

EOS = ByteTokenizer.eos_id


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A prepared corpus of 80 documents (seq_len 32: about 330 rows per epoch)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    cfg = data_config(tmp, write_corpus(tmp / "corpus", num_files=4, paragraphs_per_file=20))
    prepare(cfg, ByteTokenizer())
    return cfg


def _cfg(prepared, **overrides):
    cfg = prepared.copy_and_resolve_references()
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def _corpus_documents(cfg) -> list[tuple]:
    """Token tuples (with eos) of every training document."""
    src = sources.open_split(cfg, "train")
    return [tuple(ByteTokenizer().encode(src[i]["text"].decode())) + (EOS,) for i in range(len(src))]


def _documents_of_stream(batches) -> list[tuple]:
    """Rebuilds documents from consecutive batches (no row shuffle): real tokens joined, cut after each eos."""
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist()
    docs, current = [], []
    for t in stream:
        current.append(t)
        if t == EOS:
            docs.append(tuple(current))
            current = []
    assert current == []
    return docs


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_every_document_exactly_once_per_epoch_across_processes(prepared, processes):
    cfg = _cfg(prepared, num_epochs=1, shuffle_window=0, batch_size=4)
    per_process = [_documents_of_stream(list(pipeline.make_iterator(cfg, ByteTokenizer(), shard=(i, processes))))
                   for i in range(processes)]
    seen = [d for docs in per_process for d in docs]
    assert collections.Counter(seen) == collections.Counter(_corpus_documents(cfg))
    for i in range(processes):
        for j in range(i + 1, processes):
            assert not set(per_process[i]) & set(per_process[j])


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_every_token_exactly_once_with_row_shuffle_and_threads(prepared, processes):
    cfg = _cfg(prepared, num_epochs=1, shuffle_window=16, num_threads=2, batch_size=8)
    tokens = collections.Counter()
    for i in range(processes):
        for batch in pipeline.make_iterator(cfg, ByteTokenizer(), shard=(i, processes)):
            assert batch["tokens"].shape == (8 // processes, cfg.seq_len)
            tokens.update(batch["tokens"][batch["segment_ids"] > 0].tolist())
    expected = collections.Counter(t for doc in _corpus_documents(cfg) for t in doc)
    assert tokens == expected


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    def first(cfg, n=6):
        it = pipeline.make_iterator(cfg, ByteTokenizer())
        return [next(it)["tokens"] for _ in range(n)]

    a, b = first(_cfg(prepared, seed=7)), first(_cfg(prepared, seed=7, num_threads=2))
    c = first(_cfg(prepared, seed=8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_each_epoch_is_a_new_permutation(prepared):
    cfg = _cfg(prepared, num_epochs=2, shuffle_window=0)
    docs = _documents_of_stream(list(pipeline.make_iterator(cfg, ByteTokenizer())))
    n = len(_corpus_documents(cfg))
    assert sorted(docs[:n]) == sorted(docs[n:]) and docs[:n] != docs[n:]


@pytest.mark.parametrize("stop_after", [0, 1, 7, 90])
def test_resume_continues_with_exactly_the_next_batch(prepared, stop_after):
    """Stop after N batches, keep only the JSON state, restore into a fresh pipeline: batches N+1.. match."""
    cfg = _cfg(prepared, num_threads=2, shuffle_window=16)  # 90 batches of 4 rows crosses the first epoch's end
    reference = pipeline.make_iterator(cfg, ByteTokenizer())
    expected = [next(reference) for _ in range(stop_after + 5)][stop_after:]

    interrupted = pipeline.make_iterator(cfg, ByteTokenizer())
    for _ in range(stop_after):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.get_state()))
    del interrupted

    resumed = pipeline.make_iterator(cfg, ByteTokenizer())
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(got[key], want[key])


def test_segment_ids_and_positions_restart_at_document_boundaries(prepared):
    batch = next(pipeline.make_iterator(_cfg(prepared, shuffle_window=0), ByteTokenizer()))
    tokens, segments, positions = batch["tokens"], batch["segment_ids"], batch["positions"]
    for row in range(tokens.shape[0]):
        assert segments[row, 0] == 1 and np.all(np.diff(segments[row]) >= 0)
        starts = np.flatnonzero(np.diff(segments[row])) + 1
        assert np.all(tokens[row, starts - 1] == EOS)  # a new segment starts right after an eos
        assert np.all(positions[row, starts] == 0)
    flat = _cfg(prepared, shuffle_window=0, reset_attention=False)
    batch = next(pipeline.make_iterator(flat, ByteTokenizer()))
    assert np.all(batch["segment_ids"] == 1)
    assert np.all(batch["positions"] == np.arange(flat.seq_len))


def test_last_batch_of_a_finite_run_is_padded(prepared):
    cfg = _cfg(prepared, num_epochs=1, batch_size=8)
    batches = list(pipeline.make_iterator(cfg, ByteTokenizer()))
    assert all(b["tokens"].shape == (8, cfg.seq_len) for b in batches)
    last = batches[-1]
    assert np.all(last["tokens"][last["segment_ids"] == 0] == 0)
    assert (last["segment_ids"] == 0).any()


def test_next_token_targets_stay_inside_documents():
    tokens = np.array([[5, 6, EOS, 7, 8, 0]])
    segments = np.array([[1, 1, 1, 2, 2, 0]])
    targets, weights = next_token_targets(tokens, segments)
    np.testing.assert_array_equal(np.asarray(targets), [[6, EOS, 7, 8, 0, 0]])
    np.testing.assert_array_equal(np.asarray(weights), [[1, 1, 0, 1, 0, 0]])


def test_bad_pipeline_input_is_a_clear_error(prepared):
    with pytest.raises(UserError, match="multiple of the number of processes"):
        pipeline.make_dataset(_cfg(prepared, batch_size=6), ByteTokenizer(), shard=(0, 4))
    with pytest.raises(UserError, match="fewer than one sequence"):
        pipeline.make_dataset(_cfg(prepared, seq_len=100_000), ByteTokenizer())
    with pytest.raises(UserError, match="no split"):
        pipeline.make_dataset(_cfg(prepared), ByteTokenizer(), split="test")
    with pytest.raises(UserError, match="shard"):
        pipeline.make_dataset(_cfg(prepared), ByteTokenizer(), shard=(4, 4))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=25), seq_len=st.integers(2, 12),
                  reset=st.booleans(), data=st.data())
def test_packing_is_lossless_and_restores_anywhere(lengths, seq_len, reset, data):
    docs = [np.arange(1, n + 1, dtype=np.int32) + 100 * i for i, n in enumerate(lengths)]

    def rows_ds():
        return PackedRows(grain.MapDataset.source(docs).map(lambda t: {"tokens": t}).to_iter_dataset(), seq_len, reset)

    rows = list(rows_ds())
    real = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in rows])
    np.testing.assert_array_equal(real, np.concatenate(docs))
    assert all(r["segment_ids"].all() for r in rows[:-1])  # padding only at the end of the last row
    last = rows[-1]["segment_ids"]
    assert np.all(last[:int((last > 0).sum())] > 0)

    stop = data.draw(st.integers(0, len(rows)))
    it = iter(rows_ds())
    for _ in range(stop):
        next(it)
    resumed = iter(rows_ds())
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    rest = list(resumed)
    assert len(rest) == len(rows) - stop
    for got, want in zip(rest, rows[stop:]):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
