"""The corpus summary printed by prepare_data: documents, tokens and bytes per token of each split.

Tokens are the pipeline's tokens (the tokenizer's ids plus the configured bos / eos per document), so
`tokens / seq_len` is the number of packed rows in one epoch. Stored as JSON next to the prepared dataset, one file
per tokenizer, so preparing again is instant.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Optional

from tqdm.auto import tqdm

from dmc_jax.data.tokenize import DocumentTokens, document_text


def split_stats(documents: int, tokens: int, text_bytes: int, estimated: bool = False) -> dict:
    """One split's numbers."""
    return {"documents": int(documents), "tokens": int(tokens), "bytes": int(text_bytes),
            "bytes_per_token": round(text_bytes / tokens, 4) if tokens else None,
            "tokens_per_document": round(tokens / documents, 1) if documents else None,
            "estimated": bool(estimated)}


def summarize_source(source, doc_tokens: DocumentTokens, max_documents: int = 0, progress: bool = False,
                     desc: str = "tokenizing") -> dict:
    """split_stats of a random-access source of documents; over its first max_documents, scaled up, if > 0."""
    n = len(source)
    k = n if max_documents <= 0 else min(n, max_documents)
    tokens = text_bytes = 0
    for i in tqdm(range(k), desc=desc, unit="doc", disable=not progress, leave=False,
                  mininterval=0.5):
        text = document_text(source[i], doc_tokens.text_key)
        tokens += len(doc_tokens.ids(text))
        text_bytes += len(text.encode("utf-8"))
    scale = n / k if k else 0.0
    return split_stats(n, round(tokens * scale), round(text_bytes * scale), estimated=k < n)


def summary_path(directory: pathlib.Path, tokenizer_tag: str, doc_tokens: DocumentTokens) -> pathlib.Path:
    """Where the summary for one tokenizer (and bos / eos choice) is stored."""
    specials = f"{'b' if doc_tokens.add_bos else ''}{'e' if doc_tokens.add_eos else ''}"
    return directory / f"dmc_jax_summary.{tokenizer_tag}.{specials or 'plain'}.json"


def load(path: pathlib.Path) -> Optional[dict]:
    """A stored summary, or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def store(path: pathlib.Path, summary: dict) -> None:
    """Writes the summary atomically (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(prefix=".summary-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    """Human-readable lines: one per split, then where the dataset is."""
    lines = [f"data: {summary['dataset']} ({summary['status']}) in {summary['dataset_dir']}"]
    for split, s in summary["splits"].items():
        approx = "~" if s["estimated"] else ""
        rows = math.ceil(s["tokens"] / summary["seq_len"]) if s["tokens"] else 0
        lines.append(f"  {split:<10} {approx}{s['documents']:>10,} documents {approx}{s['tokens']:>13,} tokens "
                     f"{s['bytes_per_token'] or 0:6.2f} bytes/token  {approx}{rows:,} rows of {summary['seq_len']}")
    return "\n".join(lines)
