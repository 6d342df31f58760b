"""Local text corpora: find and safely read .txt / .txt.gz / .md files, cut them into documents, assign splits.

A document is either a whole file (`unit='file'`) or a paragraph (`unit='paragraph'`: text between blank lines;
consecutive paragraphs of one file are merged until a document has at least `min_chars` characters).

The train / validation split is a property of each document's text alone: a document is held out when a keyed
64-bit BLAKE2b hash of its UTF-8 text is below `cut = validation_fraction * 2**64`. It does not depend on file
order, on the machine or on the other documents, so it never changes between runs and identical documents
(duplicated paragraphs) always land in the same split. One exception keeps tiny corpora usable: when no document
hashes below the cut but a validation split was asked for, the cut is raised just above the smallest hash, so
exactly that one document is held out.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
import re
import zlib
from typing import Callable, Iterator, Optional, Sequence

from tqdm.auto import tqdm

from dmc_jax.errors import UserError
from dmc_jax.user_files import decode_text

SUFFIXES = (".txt", ".txt.gz", ".md")
UNITS = ("paragraph", "file")
_SPLIT_KEY = b"dmc_jax.split.v1"
_PARAGRAPH_BREAK = re.compile(r"\n[ \t\f\v]*\n\s*")


def has_text_suffix(path: pathlib.Path) -> bool:
    """True for the file names a corpus is made of."""
    return path.name.lower().endswith(SUFFIXES)


def list_text_files(directory: str | pathlib.Path) -> list[pathlib.Path]:
    """The corpus files under directory (recursive, hidden entries skipped), sorted by relative path."""
    root = pathlib.Path(directory).expanduser()
    if not root.exists():
        raise UserError(f"data.source directory {str(root)!r} does not exist; point data.source at a directory "
                        f"of {'/'.join(SUFFIXES)} files")
    if not root.is_dir():
        raise UserError(f"data.source {str(root)!r} is not a directory; point it at a directory of text files")
    files = [p for p in root.rglob("*")
             if p.is_file() and has_text_suffix(p)
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise UserError(f"no {'/'.join(SUFFIXES)} files in {str(root)!r}; add text files or choose another "
                        f"data.source")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def read_text_file(path: pathlib.Path) -> str:
    """The UTF-8 text of a .txt/.md file or of a gzipped one; UserError for unreadable, binary or non-UTF-8 files."""
    try:
        raw = path.read_bytes()
        if path.name.lower().endswith(".gz"):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"cannot read corpus file {str(path)!r} ({type(e).__name__}: {e}); fix its permissions or "
                        f"remove it from the corpus directory") from None
    return decode_text(raw, f"corpus file {str(path)!r}", if_binary="remove it from the corpus directory",
                       if_not_utf8="convert it to UTF-8 or remove it")


def split_documents(text: str, unit: str, min_chars: int = 0) -> list[str]:
    """The documents of one file's text: the stripped file, or its paragraphs merged up to min_chars; no empties."""
    if unit == "file":
        text = text.strip()
        return [text] if text else []
    if unit != "paragraph":
        raise UserError(f"data.document_unit must be one of {UNITS}, got {unit!r}")
    documents, pending = [], []
    pending_chars = 0
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        pending.append(paragraph)
        pending_chars += len(paragraph)
        if pending_chars >= min_chars:
            documents.append("\n\n".join(pending))
            pending, pending_chars = [], 0
    if pending:
        documents.append("\n\n".join(pending))
    return documents


def split_hash(text: str) -> int:
    """The 64-bit keyed hash deciding a document's split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=_SPLIT_KEY).digest()
    return int.from_bytes(digest, "big")


def is_validation(text: str, cut: int) -> bool:
    """Whether a document is held out for validation (hash below cut)."""
    return split_hash(text) < cut


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of a local corpus: where it came from (relative path, index in file) and its text."""

    source: str
    index: int
    text: str

    @property
    def key(self) -> str:
        return f"{self.source}#{self.index}"


def iter_documents(root: pathlib.Path, files: Sequence[pathlib.Path], unit: str,
                   min_chars: int) -> Iterator[Document]:
    """Every document of the corpus, file by file in the given order."""
    for path in files:
        source = path.relative_to(root).as_posix()
        for index, text in enumerate(split_documents(read_text_file(path), unit, min_chars)):
            yield Document(source, index, text)


def fingerprint(root: pathlib.Path, files: Sequence[pathlib.Path], unit: str, min_chars: int,
                validation_fraction: float) -> str:
    """12 hex digits naming a corpus + options: the relative paths and raw bytes of its files and the options."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr((_SPLIT_KEY, unit, min_chars, float(validation_fraction))).encode())
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        try:
            with open(path, "rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        except OSError as e:
            raise UserError(f"cannot read corpus file {str(path)!r} ({type(e).__name__}: {e}); fix its permissions "
                            f"or remove it from the corpus directory") from None
        digest.update(b"\0")
    return digest.hexdigest()[:12]


@dataclasses.dataclass(frozen=True)
class CorpusScan:
    """What one validating pass over a local corpus found; `cut` is the validation hash cut to write with.

    documents / text_bytes / tokens are per split ('train', 'validation'); tokens only when a counter was given.
    """

    root: pathlib.Path
    files: tuple[pathlib.Path, ...]
    cut: int
    documents: dict[str, int]
    text_bytes: dict[str, int]
    tokens: Optional[dict[str, int]]


def scan_corpus(root: pathlib.Path, files: Sequence[pathlib.Path], unit: str, min_chars: int,
                validation_fraction: float, count_tokens: Optional[Callable[[str], int]] = None,
                progress: bool = False) -> CorpusScan:
    """Reads and validates every file once, decides the validation cut, counts documents (and tokens) per split."""
    cut = min(int(validation_fraction * 2.0**64), 2**64)
    hashes, sizes, tokens = [], [], []
    with tqdm(total=len(files), desc="reading corpus", unit="file", disable=not progress, leave=False,
              mininterval=0.5) as bar:
        for path in files:
            for doc in iter_documents(root, [path], unit, min_chars):
                hashes.append(split_hash(doc.text))
                sizes.append(len(doc.text.encode("utf-8")))
                tokens.append(count_tokens(doc.text) if count_tokens else 0)
            bar.set_postfix(documents=len(hashes), refresh=False)
            bar.update(1)
    if not hashes:
        raise UserError(f"the corpus files in {str(root)!r} contain no text; add text or choose another data.source")
    if validation_fraction > 0 and min(hashes) >= cut:
        cut = min(hashes) + 1
    held_out = [h < cut for h in hashes]
    if all(held_out):
        raise UserError(f"data.validation_fraction={validation_fraction} leaves no training documents "
                        f"({len(hashes)} documents in {str(root)!r}); add text or lower data.validation_fraction")

    def per_split(values):
        return {"train": sum(v for v, h in zip(values, held_out) if not h),
                "validation": sum(v for v, h in zip(values, held_out) if h)}

    return CorpusScan(root, tuple(files), cut, per_split([1] * len(hashes)), per_split(sizes),
                      per_split(tokens) if count_tokens else None)

