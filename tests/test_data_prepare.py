"""Corpus preparation: documents, deterministic splits, the TFDS dataset, idempotency, summaries, bad input."""

from __future__ import annotations

import gzip
import pathlib
import shutil

import pytest

from dmc_jax.data import local_text_builder, options, sources, text_files
from dmc_jax.data.prepare import prepare
from dmc_jax.data.summary import format_summary
from dmc_jax.errors import UserError
from tests.test_data_helpers import ByteTokenizer, data_config, write_corpus
from tests.shared_corpus import corpus_file



def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message and message
    return message


def _finished_datasets(data_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every directory that looks like a finished TFDS dataset."""
    return [p.parent for p in data_dir.rglob("dataset_info.json")]


def test_paragraphs_files_and_merging():
    text = "one two\n\n\nthree\n  \nfour five six\n\n"
    assert text_files.split_documents(text, "paragraph") == ["one two", "three", "four five six"]
    assert text_files.split_documents(text, "paragraph", min_chars=8) == ["one two\n\nthree", "four five six"]
    assert text_files.split_documents(text, "file") == [text.strip()]
    assert text_files.split_documents(" \n\n ", "file") == []


def test_split_depends_only_on_text(tmp_path):
    """Reordering / renaming files does not move any document between splits."""
    a = write_corpus(tmp_path / "a", num_files=4, paragraphs_per_file=30)
    b = tmp_path / "b"
    b.mkdir()
    for i, f in enumerate(sorted(a.iterdir(), reverse=True)):
        shutil.copy(f, b / f"renamed{i}_{f.name}")

    def held_out(root):
        scan = text_files.scan_corpus(root, text_files.list_text_files(root), "paragraph", 0, 0.2)
        docs = text_files.iter_documents(root, text_files.list_text_files(root), "paragraph", 0)
        return scan, {d.text for d in docs if text_files.is_validation(d.text, scan.cut)}

    scan_a, val_a = held_out(a)
    scan_b, val_b = held_out(b)
    assert val_a == val_b and 0 < len(val_a) < scan_a.documents["train"]
    assert scan_a.documents == scan_b.documents


def test_tiny_corpus_still_gets_one_validation_document(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "a.txt").write_text("first document\n\nsecond document\n\nthird document")
    scan = text_files.scan_corpus(root, text_files.list_text_files(root), "paragraph", 0, 0.001)
    assert scan.documents == {"train": 2, "validation": 1}
    with pytest.raises(UserError, match="no training documents"):
        (root / "a.txt").write_text("only one document")
        text_files.scan_corpus(root, text_files.list_text_files(root), "paragraph", 0, 0.1)


def test_prepare_writes_reads_back_and_is_idempotent(tmp_path):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = data_config(tmp_path, corpus)
    first = prepare(cfg, ByteTokenizer())
    assert first["status"] == "prepared"
    dataset_dir = pathlib.Path(first["dataset_dir"])
    assert _finished_datasets(tmp_path / "tfds") == [dataset_dir]
    stamp = (dataset_dir / "dataset_info.json").stat().st_mtime_ns

    # Every document of the corpus is in exactly one split, with its text intact.
    resolved = sources.resolve(cfg)
    expected = sorted(d.text for d in text_files.iter_documents(resolved.root, resolved.files, "paragraph", 0))
    read = []
    for split in ("train", "validation"):
        src = sources.open_split(cfg, split)
        assert len(src) == first["splits"][split]["documents"]
        read += [src[i]["text"].decode() for i in range(len(src))]
    assert sorted(read) == expected
    tokens = sum(len(t.encode()) + 1 for t in expected)  # byte tokenizer + eos per document
    assert first["splits"]["train"]["tokens"] + first["splits"]["validation"]["tokens"] == tokens
    assert "bytes/token" in format_summary(first)

    again = prepare(cfg, ByteTokenizer())
    assert again["status"] == "reused" and again["splits"] == first["splits"]
    assert (dataset_dir / "dataset_info.json").stat().st_mtime_ns == stamp

    (corpus / "extra.txt").write_text("a brand new paragraph of text for the corpus")
    changed = prepare(cfg, ByteTokenizer())
    assert changed["status"] == "prepared" and changed["dataset_dir"] != first["dataset_dir"]


def test_prepare_shared_corpus_sample(tmp_path):
    """A slice of the real shared corpus (gzip, paragraphs merged into long documents)."""
    root = tmp_path / "shared"
    root.mkdir()
    with gzip.open(corpus_file("perl-doc.txt.gz"), "rt") as f:
        (root / "perl.txt").write_text(f.read(200_000))
    cfg = data_config(tmp_path, root, min_document_chars=2000, seq_len=256)
    result = prepare(cfg, ByteTokenizer())
    train = result["splits"]["train"]
    assert train["documents"] > 50 and train["tokens_per_document"] > 2000
    assert 0.9 < train["bytes_per_token"] <= 1.0


def test_unchanged_corpus_is_not_prepared_until_prepare_runs(tmp_path):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "corpus"))
    with pytest.raises(UserError, match="prepare_data") as e:
        sources.open_split(cfg, "train")
    _one_line(e)


@pytest.mark.parametrize("case", ["missing", "empty", "no_text_files", "binary", "latin1", "bad_gzip", "unreadable",
                                  "blank", "too_small"])
def test_bad_input_is_one_clear_line_and_nothing_is_written(tmp_path, case, monkeypatch):
    root = tmp_path / "corpus"
    if case != "missing":
        write_corpus(root, num_files=2)
    if case == "empty":
        shutil.rmtree(root)
        root.mkdir()
    elif case == "no_text_files":
        for f in root.iterdir():
            f.rename(f.with_suffix(".rst"))
    elif case == "binary":
        (root / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    elif case == "latin1":
        (root / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    elif case == "bad_gzip":
        (root / "broken.txt.gz").write_bytes(b"\x1f\x8b\x08\x00 truncated")
    elif case == "unreadable":
        bad = root / "locked.txt"
        bad.write_text("secret")
        real = pathlib.Path.read_bytes
        monkeypatch.setattr(pathlib.Path, "read_bytes",
                            lambda p: (_ for _ in ()).throw(PermissionError(13, "Permission denied")) if p == bad
                            else real(p))
        monkeypatch.setattr("builtins.open", _deny(bad, open))
    elif case == "blank":
        shutil.rmtree(root)
        root.mkdir()
        (root / "blank.txt").write_text("\n\n   \n")
    cfg = data_config(tmp_path, root, seq_len=100_000 if case == "too_small" else 32)
    expected = {"missing": "does not exist", "empty": "no .txt", "no_text_files": "no .txt", "binary": "binary",
                "latin1": "not UTF-8", "bad_gzip": "cannot read", "unreadable": "cannot read",
                "blank": "no text", "too_small": "fewer than one sequence"}[case]
    with pytest.raises(UserError, match=expected) as e:
        prepare(cfg, ByteTokenizer())
    _one_line(e)
    assert not (tmp_path / "tfds").exists() or _finished_datasets(tmp_path / "tfds") == []


def _deny(path, real_open):
    def fake_open(file, *args, **kwargs):
        if pathlib.Path(file) == path:
            raise PermissionError(13, "Permission denied")
        return real_open(file, *args, **kwargs)
    return fake_open


def test_failure_while_writing_leaves_no_finished_dataset(tmp_path, monkeypatch):
    cfg = data_config(tmp_path, write_corpus(tmp_path / "corpus"))
    original = local_text_builder.LocalText._generate_examples

    def failing(self, cut, held_out):
        for i, example in enumerate(original(self, cut, held_out)):
            if i == 5:
                raise KeyboardInterrupt  # the run is stopped half-way through writing
            yield example

    monkeypatch.setattr(local_text_builder.LocalText, "_generate_examples", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, ByteTokenizer())
    assert _finished_datasets(tmp_path / "tfds") == []
    with pytest.raises(UserError, match="prepare_data"):
        sources.open_split(cfg, "train")
    monkeypatch.undo()
    assert prepare(cfg, ByteTokenizer())["status"] == "prepared"


def test_catalog_dataset_offline_is_a_clear_error(tmp_path):
    cfg = data_config(tmp_path, "tfds:c4/en:3.1.0")
    with pytest.raises(UserError, match="c4/en") as e:
        prepare(cfg, ByteTokenizer())
    _one_line(e)
    with pytest.raises(UserError, match="c4/en") as e:
        sources.open_split(cfg, "train")
    _one_line(e)


@pytest.mark.parametrize("field,value,match", [
    ("seq_len", 1, "data.seq_len"), ("batch_size", 0, "data.batch_size"), ("document_unit", "page", "document_unit"),
    ("validation_fraction", 0.9, "validation_fraction"), ("source", "tfds:", "tfds"), ("seed", -1, "data.seed"),
    ("prefetch", 0, "data.prefetch"), ("num_threads", 1000, "num_threads")])
def test_validate_names_the_field(field, value, match):
    cfg = options.default_config()
    cfg[field] = value
    with pytest.raises(UserError, match=match):
        options.validate(cfg)


def test_default_config_is_valid():
    options.validate(options.default_config())


def test_prepared_tfds_dataset_by_name_needs_no_network(tmp_path):
    """The 'tfds:NAME' path: a dataset already prepared in data_dir is summarized (sampled) and read offline."""
    cfg = data_config(tmp_path, write_corpus(tmp_path / "corpus"))
    local = prepare(cfg, ByteTokenizer())
    for stored in pathlib.Path(local["dataset_dir"]).glob("dmc_jax_summary.*.json"):
        stored.unlink()
    by_name = data_config(tmp_path, "tfds:" + local["dataset"], summary_max_documents=10)
    result = prepare(by_name, ByteTokenizer())
    train = result["splits"]["train"]
    assert result["status"] == "prepared" and train["estimated"]
    assert train["documents"] == local["splits"]["train"]["documents"]
    assert 0.5 < train["tokens"] / local["splits"]["train"]["tokens"] < 2
    assert len(sources.open_split(by_name, "train")) == train["documents"]


def test_corpus_changed_while_writing_is_an_error_not_a_stale_dataset(tmp_path, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    cfg = data_config(tmp_path, corpus)
    original = local_text_builder.LocalText._generate_examples

    def editing(self, cut, held_out):
        (corpus / "late.txt").write_text("a file that appears in the middle of writing")
        yield from original(self, cut, held_out)

    monkeypatch.setattr(local_text_builder.LocalText, "_generate_examples", editing)
    with pytest.raises(UserError, match="changed while") as e:
        prepare(cfg, ByteTokenizer())
    _one_line(e)
    assert _finished_datasets(tmp_path / "tfds") == []
