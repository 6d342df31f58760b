"""Preparing data.source once: fetch the default corpus, write the TFDS dataset, summarize it. Idempotent.

Local corpora are read and checked in full before anything is written (unreadable / binary / non-UTF-8 files, no
text, a training split shorter than one sequence are UserErrors), then TFDS writes the dataset into a temporary
directory renamed into place at the end: an interrupted run never leaves something that looks finished. Running
again with the same corpus, options and tokenizer only reads the stored summary.
"""

from __future__ import annotations

import shutil
import socket

from dmc_jax.data import local_text_builder, sources, summary as summary_lib, text_files
from dmc_jax.data.options import validate
from dmc_jax.data.tokenize import DocumentTokens, tokenizer_fingerprint
from dmc_jax.errors import UserError


def prepare(cfg_data, tokenizer) -> dict:
    """Makes data.source ready for the pipeline; returns the summary (see dmc_jax/data/summary.py)."""
    validate(cfg_data)
    doc_tokens = DocumentTokens(tokenizer, cfg_data.add_bos, cfg_data.add_eos, cfg_data.text_key)
    tag = tokenizer_fingerprint(tokenizer)
    resolved = sources.resolve(cfg_data, fetch=True)
    if resolved.kind == "local":
        result = _prepare_local(cfg_data, resolved, doc_tokens, tag)
    else:
        result = _prepare_catalog(cfg_data, resolved, doc_tokens, tag)
    result["seq_len"] = cfg_data.seq_len
    _check_long_enough(cfg_data, result)
    return result


def _prepare_local(cfg_data, resolved: sources.Resolved, doc_tokens: DocumentTokens, tag: str) -> dict:
    path = summary_lib.summary_path(resolved.dataset_dir, tag, doc_tokens)
    if sources.is_prepared(resolved):
        stored = summary_lib.load(path)
        if stored is not None:
            return dict(stored, status="reused")
        splits = _summarize_splits(cfg_data, resolved, doc_tokens, ("train", "validation"))
        return _finish(path, resolved, tag, splits, "reused, summarized")
    scan = text_files.scan_corpus(resolved.root, resolved.files, cfg_data.document_unit, cfg_data.min_document_chars,
                                  cfg_data.validation_fraction, lambda text: len(doc_tokens.ids(text)),
                                  progress=cfg_data.progress)
    splits = {s: summary_lib.split_stats(scan.documents[s], scan.tokens[s], scan.text_bytes[s])
              for s in ("train", "validation") if scan.documents[s]}
    _check_long_enough(cfg_data, {"splits": splits, "dataset": resolved.name})
    _write_local(cfg_data, resolved, scan)
    return _finish(path, resolved, tag, splits, "prepared")


def _write_local(cfg_data, resolved: sources.Resolved, scan: text_files.CorpusScan) -> None:
    """Writes the dataset with TFDS (array_record, no tensorflow needed)."""
    import tensorflow_datasets as tfds

    config = local_text_builder.config_for(resolved.config, resolved.root, cfg_data.document_unit,
                                           cfg_data.min_document_chars, scan.cut)
    tfds.display_progress_bar(cfg_data.progress)
    builder = local_text_builder.LocalText(config=config, data_dir=cfg_data.data_dir, file_format="array_record")
    builder.download_and_prepare(file_format="array_record")
    # The files were read twice (scan, then TFDS); if they changed in between, the dataset matches neither.
    now = text_files.fingerprint(resolved.root, text_files.list_text_files(resolved.root), cfg_data.document_unit,
                                 cfg_data.min_document_chars, cfg_data.validation_fraction)
    if now != resolved.fingerprint:
        shutil.rmtree(resolved.dataset_dir, ignore_errors=True)
        raise UserError(f"the corpus {str(resolved.root)!r} changed while it was being prepared; run prepare_data "
                        f"again once it is stable")


def _prepare_catalog(cfg_data, resolved: sources.Resolved, doc_tokens: DocumentTokens, tag: str) -> dict:
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(resolved.name, data_dir=cfg_data.data_dir)
    except Exception as e:  # DatasetNotFoundError, or ImportError from a catalog builder that needs tensorflow
        raise UserError(f"TFDS catalog dataset {resolved.name!r} cannot be loaded ({type(e).__name__}): the name is "
                        f"wrong, or its builder needs tensorflow (pip install tensorflow) and internet") from None
    if not builder.is_prepared():
        _require_internet(resolved.name)
        tfds.display_progress_bar(cfg_data.progress)
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # network, disk, missing apache-beam, ...: all end the same way for the user
            first = (str(e).strip().splitlines() or [""])[0][:200]
            raise UserError(f"could not download and prepare TFDS dataset {resolved.name!r} ({type(e).__name__}: "
                            f"{first}); check the network, or use a local data.source") from None
    resolved = sources.Resolved("tfds", resolved.name, dataset_dir=builder.data_path)
    path = summary_lib.summary_path(builder.data_path, tag, doc_tokens)
    stored = summary_lib.load(path)
    if stored is not None:
        return dict(stored, status="reused")
    names = [s.split("[")[0] for s in (cfg_data.train_split, cfg_data.eval_split)]
    splits = _summarize_splits(cfg_data, resolved, doc_tokens, [n for n in dict.fromkeys(names)
                                                                 if n in builder.info.splits])
    return _finish(path, resolved, tag, splits, "prepared")


def _summarize_splits(cfg_data, resolved: sources.Resolved, doc_tokens: DocumentTokens, names) -> dict:
    """split_stats read back from the prepared dataset (present splits only)."""
    splits = {}
    for name in names:
        try:
            source = sources.open_split(cfg_data, name, resolved)
        except UserError:
            continue
        splits[name] = summary_lib.summarize_source(source, doc_tokens, cfg_data.summary_max_documents,
                                                    cfg_data.progress, f"tokenizing {name}")
    return splits


def _finish(path, resolved: sources.Resolved, tag: str, splits: dict, status: str) -> dict:
    result = {"dataset": resolved.name, "dataset_dir": str(resolved.dataset_dir), "tokenizer": tag,
              "splits": splits, "status": status}
    summary_lib.store(path, result)
    return result


def _check_long_enough(cfg_data, result: dict) -> None:
    """UserError when the training split holds fewer tokens than one packed row."""
    train = result["splits"].get(cfg_data.train_split.split("[")[0])
    if train is not None and train["tokens"] < cfg_data.seq_len:
        raise UserError(f"the training split of {result['dataset']} has {train['tokens']} tokens, fewer than one "
                        f"sequence (data.seq_len={cfg_data.seq_len}); add text or lower data.seq_len")


def _require_internet(name: str, host: str = "storage.googleapis.com") -> None:
    """UserError at once when offline, instead of TFDS retrying downloads for minutes."""
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError:
        raise UserError(f"TFDS dataset {name!r} must be downloaded but {host} cannot be reached (offline?); use a "
                        f"local data.source or prepare it on a machine with internet and copy data.data_dir") from None
