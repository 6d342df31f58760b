"""Helpers for the data tests (no tests here): the byte-level tokenizer and tiny corpora written to a tmp dir."""

from __future__ import annotations

import gzip
import pathlib
import random

import ml_collections

from dmc_jax.data import options
from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer  # noqa: F401  (re-exported for the data tests)

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()


def write_corpus(root: pathlib.Path, num_files: int = 3, paragraphs_per_file: int = 20, seed: int = 0,
                 gz: bool = True) -> pathlib.Path:
    """A directory of small text files (.txt, .txt.gz, .md) with unique numbered paragraphs."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for f in range(num_files):
        paragraphs = [f"doc {f}.{p}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
                      for p in range(paragraphs_per_file)]
        text = "\n\n".join(paragraphs) + "\n"
        kind = f % 3
        if kind == 0 and gz:
            (root / f"file{f}.txt.gz").write_bytes(gzip.compress(text.encode()))
        elif kind == 1:
            (root / f"file{f}.md").write_text(text)
        else:
            (root / f"file{f}.txt").write_text(text)
    return root


def data_config(tmp_path: pathlib.Path, source: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    """A small, fast data config over a corpus in tmp_path."""
    c = options.default_config()
    c.source = str(source)
    c.data_dir = str(tmp_path / "tfds")
    c.cache_dir = str(tmp_path / "cache")
    c.min_document_chars = 0
    c.validation_fraction = 0.1
    c.seq_len = 32
    c.batch_size = 4
    c.shuffle_window = 8
    c.num_threads = 0
    c.progress = False
    for k, v in overrides.items():
        c[k] = v
    return c
