"""Packed batches through the model: with reset on, no attention crosses a document boundary."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from dmc_jax.data import pipeline
from dmc_jax.data.prepare import prepare
from dmc_jax.model.config import tiny_config
from dmc_jax.model.llama import forward
from dmc_jax.model.params import init_params
from tests.test_data_helpers import ByteTokenizer, data_config, write_corpus


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("model")
    cfg = data_config(tmp, write_corpus(tmp / "corpus", num_files=2), seq_len=64, shuffle_window=0)
    prepare(cfg, ByteTokenizer())
    model_cfg = tiny_config(vocab_size=ByteTokenizer.vocab_size, max_seq_len=64)
    return cfg, model_cfg, init_params(model_cfg, jax.random.PRNGKey(0))


def _row_with_two_documents(cfg, reset: bool) -> dict:
    cfg = cfg.copy_and_resolve_references()
    cfg.reset_attention = reset
    for batch in pipeline.make_iterator(cfg, ByteTokenizer()):
        for r in range(batch["tokens"].shape[0]):
            ends = np.flatnonzero(batch["tokens"][r] == ByteTokenizer.eos_id) + 1
            cut = int(ends[0]) if len(ends) else 0
            if 4 <= cut <= cfg.seq_len - 4:
                return {k: v[r:r + 1] for k, v in batch.items()} | {"cut": cut}
    raise AssertionError("no row holds two documents")


_forward = jax.jit(forward, static_argnums=2)


def _logits(params, model_cfg, row, tokens=None):
    tokens = row["tokens"] if tokens is None else tokens
    return np.asarray(_forward(params, tokens, model_cfg, row["positions"], row["segment_ids"]))


def test_second_document_sees_nothing_of_the_first(setup):
    cfg, model_cfg, params = setup
    row = _row_with_two_documents(cfg, reset=True)
    cut = row["cut"]
    assert row["segment_ids"][0, cut] == row["segment_ids"][0, cut - 1] + 1 and row["positions"][0, cut] == 0

    logits = _logits(params, model_cfg, row)
    # Changing every token of the first document leaves the second document's logits unchanged...
    scrambled = row["tokens"].copy()
    scrambled[0, :cut] = (scrambled[0, :cut] * 7 + 11) % ByteTokenizer.vocab_size
    np.testing.assert_allclose(_logits(params, model_cfg, row, scrambled)[0, cut:], logits[0, cut:], atol=1e-5)
    # ...and equal to running the rest of the row on its own (positions from 0, as the packer wrote them).
    alone = {k: v[:, cut:] for k, v in row.items() if k != "cut"}
    np.testing.assert_allclose(_logits(params, model_cfg, alone)[0], logits[0, cut:], atol=1e-4)


def test_without_reset_the_second_document_does_see_the_first(setup):
    cfg, model_cfg, params = setup
    row = _row_with_two_documents(cfg, reset=False)
    cut = row["cut"]
    assert np.all(row["segment_ids"] == 1)
    scrambled = row["tokens"].copy()
    scrambled[0, :cut] = (scrambled[0, :cut] * 7 + 11) % ByteTokenizer.vocab_size
    delta = np.abs(_logits(params, model_cfg, row, scrambled)[0, cut:] - _logits(params, model_cfg, row)[0, cut:])
    assert delta.max() > 1e-3
