"""The TFDS builder of a local text corpus: documents of a directory of text files, written as array_record.

It runs without tensorflow (prepare with `file_format="array_record"`, read back with `tfds.data_source` or
`tfds.builder_from_directory(...).as_data_source(...)`). Each corpus + options is one builder config, named
`<directory name>_<fingerprint>`, so a changed corpus is a new dataset and an unchanged one is reused. Features:
`text` (the document) and `source` (its file, relative to the corpus directory, and index in that file).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

import tensorflow_datasets as tfds

from dmc_jax.data import text_files

NAME = "local_text"
VERSION = "1.0.0"


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    """One local corpus and the options that shape its documents and splits (all part of its name)."""

    source_dir: str = ""
    document_unit: str = "paragraph"
    min_document_chars: int = 0
    validation_cut: str = "0"  # decimal: the 64-bit validation hash cut (see text_files), too big for proto ints


class LocalText(tfds.core.GeneratorBasedBuilder):
    """Documents of a local directory of .txt / .txt.gz / .md files; splits 'train' and (maybe) 'validation'."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "Documents of local text files, hash-based train/validation split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description="Local text corpus prepared by dmc_jax.",
            features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()}),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cut = int(self.builder_config.validation_cut)
        splits = {"train": self._generate_examples(cut, held_out=False)}
        if cut > 0:
            splits["validation"] = self._generate_examples(cut, held_out=True)
        return splits

    def _generate_examples(self, cut: int, held_out: bool):
        cfg = self.builder_config
        root = pathlib.Path(cfg.source_dir)
        files = text_files.list_text_files(root)
        for doc in text_files.iter_documents(root, files, cfg.document_unit, cfg.min_document_chars):
            if text_files.is_validation(doc.text, cut) == held_out:
                yield doc.key, {"text": doc.text, "source": doc.key}


def config_name(label: str, fingerprint: str) -> str:
    """`<label>_<fingerprint>`: the builder config (and dataset directory) name of a corpus."""
    slug = re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")[:40] or "corpus"
    return f"{slug}_{fingerprint}"


def config_for(name: str, root: pathlib.Path, unit: str, min_chars: int, cut: int) -> LocalTextConfig:
    """The builder config of a scanned corpus."""
    return LocalTextConfig(name=name, description=f"documents of {root}", source_dir=str(root), document_unit=unit,
                           min_document_chars=min_chars, validation_cut=str(cut))


def dataset_dir(data_dir: str | pathlib.Path, config_name: str) -> pathlib.Path:
    """Where the prepared dataset of a config lives (exists only once it is complete)."""
    return pathlib.Path(data_dir) / NAME / config_name / VERSION
