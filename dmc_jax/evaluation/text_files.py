"""Evaluation text from .txt / .md / .txt.gz files: the data package's reader, with eval's own wording."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from dmc_jax.data.text_files import read_text_file
from dmc_jax.errors import UserError


def read_text(path: str) -> str:
    """UTF-8 text of path (gzip if it ends in .gz); UserError for missing, unreadable, binary or empty files."""
    if not os.path.isfile(path):
        raise UserError(f"text file {path!r} not found; check eval.text_files")
    text = read_text_file(pathlib.Path(path))
    if not text.strip():
        raise UserError(f"text file {path} is empty; give a file with text in it")
    return text


def token_rows(tokenizer, files, tokens: int, rows: int, what: str = "--text-files") -> np.ndarray:
    """[rows, tokens] int32 consecutive windows of the files' text, read in order until enough; fewer rows if the
    text runs out, UserError if it does not fill one (`what`: the option that names the files)."""
    ids = []
    for path in files:
        ids += tokenizer.encode(read_text(path))
        if len(ids) >= tokens * rows:
            break
    n = min(rows, len(ids) // tokens)
    if n == 0:
        raise UserError(f"the text ({', '.join(map(str, files))}) has {len(ids)} tokens, fewer than {tokens}; give "
                        f"longer {what} or fewer tokens")
    return np.asarray(ids[: n * tokens], np.int32).reshape(n, tokens)
