"""The prepare_data task and the pipeline with the real SmolLM2 tokenizer on a slice of the shared corpus."""

from __future__ import annotations

import gzip

import ml_collections
import numpy as np
import pytest

import dmc_jax.weights
from dmc_jax.data import pipeline
from dmc_jax.tasks import prepare_data
from tests.test_data_helpers import data_config
from tests.shared_corpus import corpus_file



@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return dmc_jax.weights.load_tokenizer("smollm2")


@pytest.mark.slow
def test_prepare_data_task_and_batches_with_smollm2(tmp_path, capsys, monkeypatch, smollm2_tokenizer):
    root = tmp_path / "python_docs"
    root.mkdir()
    with gzip.open(corpus_file("python3.11-doc.txt.gz"), "rt") as f:
        text = f.read(120_000)
    (root / "python.txt").write_text(text)
    config = ml_collections.ConfigDict({"task": "prepare_data", "model": {"source": "smollm2"},
                                        "data": data_config(tmp_path, root, seq_len=128, min_document_chars=1000)})
    requested = []
    monkeypatch.setattr(dmc_jax.weights, "load_tokenizer",
                        lambda source: requested.append(source) or smollm2_tokenizer)

    summary = prepare_data.run(config)
    assert requested == ["smollm2"]
    assert "bytes/token" in capsys.readouterr().out
    train = summary["splits"]["train"]
    assert 3.5 < train["bytes_per_token"] < 5.5 and train["tokens"] > 20_000
    assert prepare_data.run(config)["status"] == "reused"

    batch = next(pipeline.make_iterator(config.data, smollm2_tokenizer))
    tokens, segments = batch["tokens"], batch["segment_ids"]
    assert tokens.shape == (4, 128) and tokens.max() < smollm2_tokenizer.vocab_size
    piece = tokens[0][segments[0] == segments[0, -1]]
    piece = piece[piece != smollm2_tokenizer.eos_id]
    decoded = smollm2_tokenizer.decode(piece.tolist())
    assert len(decoded) > 20 and decoded.strip()[:20] in text
