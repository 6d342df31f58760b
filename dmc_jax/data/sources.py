"""Where documents come from: `data.source` resolved to a prepared TFDS dataset, and its splits opened for reading.

    'default'     the default corpus (dmc_jax/data/default_corpus.py), fetched into data.cache_dir by prepare_data
    a directory   a local corpus of .txt / .txt.gz / .md files, prepared as the TFDS dataset local_text/<name>
    'tfds:NAME'   a TFDS catalog dataset (e.g. tfds:c4/en:3.1.0), prepared by TFDS itself (needs internet)

Reading never writes: a corpus that is not prepared (or changed since it was) is a UserError naming prepare_data.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional, Sequence

from dmc_jax.data import default_corpus, local_text_builder, text_files
from dmc_jax.data.options import TFDS_PREFIX
from dmc_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A data.source made concrete: kind 'local' (corpus directory + its dataset directory) or 'tfds' (a name)."""

    kind: str
    name: str  # the TFDS name: 'local_text/<config>' or the catalog name
    config: str = ""  # local: the builder config name, '<directory name>_<fingerprint>'
    root: Optional[pathlib.Path] = None
    files: tuple = ()
    fingerprint: str = ""
    dataset_dir: Optional[pathlib.Path] = None


def resolve(cfg_data, fetch: bool = False) -> Resolved:
    """Resolves data.source; with fetch, the default corpus is downloaded when missing (prepare_data only)."""
    source = cfg_data.source.strip()
    if source.startswith(TFDS_PREFIX):
        return Resolved("tfds", source[len(TFDS_PREFIX):].strip())
    if source == "default":
        if fetch:
            default_corpus.ensure_default_corpus(cfg_data.cache_dir)
        root, label = default_corpus.train_dir(cfg_data.cache_dir), default_corpus.DIRNAME
        if not root.is_dir():
            raise UserError(f"the default corpus is not in {str(root)!r} yet; run the prepare_data task first")
    else:
        root = pathlib.Path(source).expanduser()
        label = root.resolve().name
    root = root.resolve()
    files = text_files.list_text_files(root)
    fp = text_files.fingerprint(root, files, cfg_data.document_unit, cfg_data.min_document_chars,
                                cfg_data.validation_fraction)
    config = local_text_builder.config_name(label, fp)
    return Resolved("local", f"{local_text_builder.NAME}/{config}", config, root, tuple(files), fp,
                    local_text_builder.dataset_dir(cfg_data.data_dir, config))


def is_prepared(resolved: Resolved) -> bool:
    """Whether a local corpus has a complete prepared dataset (TFDS renames it into place only when finished)."""
    return resolved.dataset_dir is not None and (resolved.dataset_dir / "dataset_info.json").is_file()


def open_split(cfg_data, split: str, resolved: Optional[Resolved] = None) -> Sequence:
    """A random-access source of the documents of one split (elements: dicts of bytes features, e.g. 'text')."""
    import tensorflow_datasets as tfds

    resolved = resolved or resolve(cfg_data)
    if resolved.kind == "local":
        if not is_prepared(resolved):
            raise UserError(f"the corpus {str(resolved.root)!r} is not prepared with these data options (or it changed "
                            f"since); run the prepare_data task first")
        builder = tfds.builder_from_directory(str(resolved.dataset_dir))
        _check_split(builder, split, resolved.name)
        return builder.as_data_source(split=split)
    try:
        builder = tfds.builder(resolved.name, data_dir=cfg_data.data_dir)
    except Exception as e:  # tfds raises many types here; every one means the same to the user
        raise UserError(f"TFDS dataset {resolved.name!r} is not available in {cfg_data.data_dir!r} "
                        f"({type(e).__name__}); run prepare_data where there is internet, or fix data.source") from None
    if not builder.is_prepared():
        raise UserError(f"TFDS dataset {resolved.name!r} is not prepared in {cfg_data.data_dir!r}; run the "
                        f"prepare_data task (needs internet) first")
    _check_split(builder, split, resolved.name)
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError:
        raise UserError(f"TFDS dataset {resolved.name!r} in {cfg_data.data_dir!r} is not in a random-access format; "
                        f"prepare it again with file_format='array_record' (the prepare_data task does)") from None


def _check_split(builder, split: str, name: str) -> None:
    """UserError unless the split's base name (before any '[...]' slice) exists."""
    base = split.split("[")[0]
    if base not in builder.info.splits:
        raise UserError(f"dataset {name!r} has no split {base!r} (it has {sorted(builder.info.splits)}); set "
                        f"data.train_split / data.eval_split, or data.validation_fraction > 0 for local corpora")
