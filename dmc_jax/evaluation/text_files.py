"""Evaluation text from .txt / .md / .txt.gz files: the data package's reader, with eval's own wording."""

from __future__ import annotations

import os
import pathlib

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
