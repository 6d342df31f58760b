"""Reads evaluation text from .txt / .md / .txt.gz files with one-line errors for bad files."""

from __future__ import annotations

import gzip
import os

from dmc_jax.errors import UserError


def read_text(path: str) -> str:
    """UTF-8 text of path (gzip if it ends in .gz)."""
    if not os.path.isfile(path):
        raise UserError(f"text file {path!r} not found; check eval.text_files")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read text file {path}: {e}; give a readable .txt, .md or .txt.gz file") from e
    if b"\x00" in raw[:65536]:
        raise UserError(f"{path} looks binary (NUL bytes); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); convert it to UTF-8") from e
    if not text.strip():
        raise UserError(f"text file {path} is empty; give a file with text in it")
    return text
