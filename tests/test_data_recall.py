"""Recall rows (dmc_jax/data/recall.py): facts spliced into training rows and restated later, deterministically."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dmc_jax.data import pipeline
from dmc_jax.data.prepare import prepare
from dmc_jax.data.recall import RecallInserter
from dmc_jax.errors import UserError
from dmc_jax.evaluation import passkey
from tests.test_data_helpers import ByteTokenizer, data_config, write_corpus

T = 256


def _row(tokens, segments=None, first_position=7):
    tokens = np.asarray(tokens, np.int32)
    segments = np.ones(len(tokens), np.int32) if segments is None else np.asarray(segments, np.int32)
    return {"tokens": tokens, "segment_ids": segments,
            "positions": (first_position + np.arange(len(tokens))).astype(np.int32)}


def _text(row) -> str:
    return ByteTokenizer().decode([int(t) for t in row["tokens"]])


def test_each_fact_is_stated_then_restated_later_and_the_row_keeps_its_shape_and_text_order():
    tok = ByteTokenizer()
    text = ("the quick brown fox jumps over the lazy dog " * 10)[:T]
    row = _row(tok.encode(text))
    recall = RecallInserter(tok, fraction=1.0, facts=2, min_gap=32)
    for seed in range(20):
        out = recall(row, np.random.default_rng(seed))
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in row.items()}
        assert all(v.dtype == np.int32 for v in out.values())
        np.testing.assert_array_equal(out["positions"], 7 + np.arange(T))
        np.testing.assert_array_equal(out["segment_ids"], row["segment_ids"])
        s = _text(out)
        numbers = re.findall(r"\d{3,}", s)
        assert len(numbers) == 4, s  # two facts, each stated twice
        for n in set(numbers):
            first, second = s.index(n), s.rindex(n)
            assert second > first + 32, s  # restated at least min_gap tokens (bytes) later
        # what is left of the text is the original text's head, in order
        stripped = s
        for n in set(numbers):
            stripped = re.sub(r"\n[^\n]*" + n + r"[^\n]*\n?", "", stripped)
        assert text.startswith(stripped.replace("\n", "")[:40])


def test_rows_with_two_documents_and_rows_not_drawn_are_unchanged():
    tok = ByteTokenizer()
    tokens = tok.encode("x" * T)
    two_docs = _row(tokens, segments=[1] * 100 + [2] * (T - 100))
    recall = RecallInserter(tok, fraction=1.0, facts=1)
    assert recall(two_docs, np.random.default_rng(0)) is two_docs
    never = RecallInserter(tok, fraction=0.0, facts=1)
    one_doc = _row(tokens)
    assert never(one_doc, np.random.default_rng(0)) is one_doc
    half = RecallInserter(tok, fraction=0.5, facts=1)
    changed = sum(half(one_doc, np.random.default_rng(s)) is not one_doc for s in range(200))
    assert 70 < changed < 130


def test_templates_never_use_the_passkey_evaluations_wording():
    from dmc_jax.data import recall
    for template in recall.FACTS + recall.RESTATE:
        for phrase in ("pass key", "Remember it", "passkey"):
            assert phrase.lower() not in template.lower()
    assert "pass key" in passkey.NEEDLE  # the evaluation's own wording, checked against above


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("recall")
    cfg = data_config(tmp, write_corpus(tmp / "corpus", num_files=3, paragraphs_per_file=40),
                      seq_len=T, min_document_chars=3000, batch_size=4)
    prepare(cfg, ByteTokenizer())
    return cfg


def test_pipeline_recall_rows_are_deterministic_resume_exactly_and_spare_the_eval_split(prepared):
    cfg = prepared.copy_and_resolve_references()
    cfg.recall_fraction, cfg.recall_facts = 1.0, 1
    tok = ByteTokenizer()
    it = pipeline.make_iterator(cfg, tok)
    batches = [next(it) for _ in range(3)]
    state = it.get_state()
    expected = next(it)
    texts = [_text({"tokens": r}) for b in batches for r in b["tokens"]]
    with_fact = [t for t in texts if any(t.count(n) == 2 for n in re.findall(r"\d{3,}", t))]
    assert len(with_fact) >= len(texts) // 2, texts[:2]  # the corpus has no 3-digit numbers of its own

    first_again = next(pipeline.make_iterator(cfg, tok))
    for k in batches[0]:
        np.testing.assert_array_equal(first_again[k], batches[0][k])
    resumed = pipeline.make_iterator(cfg, tok)
    resumed.set_state(state)
    got = next(resumed)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])

    plain = cfg.copy_and_resolve_references()
    plain.recall_fraction = 0.0
    ev_recall = next(iter(pipeline.make_eval_dataset(cfg, tok)))
    ev_plain = next(iter(pipeline.make_eval_dataset(plain, tok)))
    for k in ev_plain:
        np.testing.assert_array_equal(ev_recall[k], ev_plain[k])
    tr_plain = next(pipeline.make_iterator(plain, tok))
    assert not np.array_equal(tr_plain["tokens"], batches[0]["tokens"])
    assert "loss_weights" not in batches[0]

    weighted = cfg.copy_and_resolve_references()
    weighted.recall_weight = 5.0
    b = next(pipeline.make_iterator(weighted, tok))
    np.testing.assert_array_equal(b["tokens"], batches[0]["tokens"])  # the same rows, now with weights
    assert b["loss_weights"].shape == b["tokens"].shape and b["loss_weights"].dtype == np.float32
    assert set(np.unique(b["loss_weights"])) == {1.0, 5.0}
    from dmc_jax.data.options import has_loss_weights  # what task plan shapes its batch by
    assert has_loss_weights(weighted) and not has_loss_weights(cfg) and not has_loss_weights(plain)


@pytest.mark.parametrize("field,value,match", [("recall_fraction", 1.5, "recall_fraction must be in"),
                                               ("recall_fraction", -0.1, "recall_fraction must be in"),
                                               ("recall_facts", 0, "recall_facts must be an integer"),
                                               ("recall_weight", 0.5, "recall_weight must be in"),
                                               ("recall_weight", 1001.0, "recall_weight must be in")])
def test_bad_recall_options_name_the_field(prepared, field, value, match):
    cfg = prepared.copy_and_resolve_references()
    cfg[field] = value
    with pytest.raises(UserError, match=match):
        pipeline.make_iterator(cfg, ByteTokenizer())


def test_recall_span_reaches_the_end_of_the_row_and_the_default_keeps_facts_in_the_first_half():
    tok = ByteTokenizer()
    text = ("the quick brown fox jumps over the lazy dog " * 10)[:T]
    row = _row(tok.encode(text))

    def first_statements(span):
        recall = RecallInserter(tok, fraction=1.0, facts=1, min_gap=32, span=span)
        out = []
        for seed in range(60):
            s = _text(recall(row, np.random.default_rng(seed)))
            number = re.findall(r"\d{3,}", s)[0]
            first, second = s.index(number), s.rindex(number)
            assert second > first + 32, s  # restated at least min_gap later, whatever the span
            out.append(first / T)
        return np.asarray(out)

    half, anywhere = first_statements(0.5), first_statements(1.0)
    assert half.max() < 0.5 and anywhere.max() > 0.6
    # the default is span 0.5 exactly: the same rows as before the option existed
    a = RecallInserter(tok, fraction=1.0, facts=2)(row, np.random.default_rng(3))
    b = RecallInserter(tok, fraction=1.0, facts=2, span=0.5)(row, np.random.default_rng(3))
    np.testing.assert_array_equal(a["tokens"], b["tokens"])


def test_recall_weight_marks_exactly_the_restatements_and_every_row_carries_the_weights():
    tok = ByteTokenizer()
    text = ("the quick brown fox jumps over the lazy dog " * 10)[:T]
    row = _row(tok.encode(text))
    recall = RecallInserter(tok, fraction=1.0, facts=2, min_gap=32, weight=20.0)
    for seed in range(10):
        out = recall(row, np.random.default_rng(seed))
        w_T = out["loss_weights"]
        assert w_T.shape == (T,) and w_T.dtype == np.float32 and set(np.unique(w_T)) <= {1.0, 20.0}
        s = _text(out)
        stressed = "".join(ch for ch, w in zip(s, w_T) if w == 20.0)  # (byte tokenizer: one token per character)
        numbers = sorted(set(re.findall(r"\d{3,}", s)))
        # the weighted characters are the two restatements: each holds its number once, and no first statement
        assert sorted(re.findall(r"\d{3,}", stressed)) == numbers, (stressed, s)
        for n in numbers:
            assert w_T[s.index(n)] == 1.0 and w_T[s.rindex(n)] == 20.0
    unchanged = RecallInserter(tok, fraction=0.0, facts=1, weight=20.0)(row, np.random.default_rng(0))
    np.testing.assert_array_equal(unchanged["tokens"], row["tokens"])
    np.testing.assert_array_equal(unchanged["loss_weights"], np.ones(T, np.float32))
    assert "loss_weights" not in RecallInserter(tok, fraction=1.0, facts=1)(row, np.random.default_rng(0))


def test_weighted_targets_weigh_the_cross_entropy_by_the_target_tokens_weight():
    import jax
    import jax.numpy as jnp

    from dmc_jax.training.losses import WEIGHT, token_cross_entropy

    rng = np.random.default_rng(0)
    B, n, V = 2, 16, 11
    tokens = rng.integers(0, V, (B, n)).astype(np.int32)
    segments = np.ones((B, n), np.int32)
    segments[1, 10:] = 2  # a document boundary: position 9 has no target
    logits = jnp.asarray(rng.standard_normal((B, n, V)), jnp.float32)
    w = np.ones((B, n), np.float32)
    w[0, 5], w[1, 3] = 7.0, 3.0
    batch = {"tokens": tokens, "segment_ids": segments, "positions": np.tile(np.arange(n), (B, 1))}
    ce, m = token_cross_entropy(logits, {**batch, "loss_weights": w})
    logp = np.asarray(jax.nn.log_softmax(logits, -1))
    num = den = 0.0
    for b in range(B):
        for t in range(n - 1):
            if segments[b, t + 1] != segments[b, t]:
                continue
            num += -logp[b, t, tokens[b, t + 1]] * w[b, t + 1]  # position t predicts token t+1: its weight
            den += w[b, t + 1]
    np.testing.assert_allclose(float(ce), num / den, rtol=1e-5)
    assert float(m[WEIGHT]) == pytest.approx(den)  # micro-batches combine by the weights' sum
    plain, _ = token_cross_entropy(logits, batch)
    assert abs(float(plain) - float(ce)) > 1e-4  # the weights change the loss
