"""The `compare` config section: which methods at which compression ratios, and how big each evaluation is.

Defaults are sized for SmolLM2-135M on a 2-core CPU (see the compare task's docstring for the time they take).
"""

from __future__ import annotations

import ml_collections

from dmc_jax.errors import require

EVALS = ("ppl", "passkey", "mc")


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.methods = ("dense", "streaming_llm", "h2o", "tova", "snapkv", "corm_capped")  # cache methods (registry names)
    c.ratios = (2, 4, 8)          # CR = context / budget for every method but dense (always CR 1, the reference)
    # KV-head conversions of the base model, each run with the dense cache: 'method:rope' (kv_heads section for
    # new_kv_heads, rank and calibration). SmolLM2: 3 -> 1 KV heads = CR 3.
    c.kv_heads = ("mean:B", "svd_a:B", "svd_a:A")
    # Other models, e.g. a DMC-retrofitted checkpoint: 'label|model source|cache method' (the method's other
    # fields come from the cache section; its budget is context / ratio when it has one).
    c.extra_models = ()
    c.evals = EVALS
    # (a) perplexity by decoding held-out text through the cache (teacher forcing)
    c.text_files = ""             # '' = the default corpus's held-out works
    c.context = 512               # tokens per sequence; the budget is context / CR
    c.prefix = 32                 # prefilled tokens; the rest is decoded through the cache
    # 'auto': layer by layer where the method's layers share nothing (every one but the paged DMC / DMS caches;
    # ~4x faster, the same computation: fp32 agrees to rounding, bf16 rounds differently), else token by token;
    # 'token': always token by token, as a server decodes (evaluation/decode_perplexity.py)
    c.decode_order = "auto"
    c.ppl_sequences = 4
    c.batch = 4
    # (b) passkey retrieval (filler: the default corpus's training text)
    c.passkey_lengths = (256, 512)
    c.passkey_depths = (0.1, 0.5, 0.9)
    c.passkey_trials = 2          # keys per (length, depth) cell
    # (c) multiple choice on local BIG-bench tasks (few-shot prompts of mc_context tokens)
    c.mc_tasks = ("date_understanding", "physical_intuition", "strategyqa")
    c.mc_items = 12               # scored examples per task
    c.mc_context = 256
    c.mc_cache_dir = "data_cache/bigbench"
    c.min_budget = 16             # budgets below this are not run
    c.resume = True               # reuse the rows of <output_dir>/rows.json measured with the same settings
    return c


def validate(c: ml_collections.ConfigDict) -> None:
    for e in c.evals:
        require(e in EVALS, f"compare.evals entries must be among {', '.join(EVALS)}; got {e!r}")
    require(all(float(r) >= 1 for r in c.ratios), f"compare.ratios must be >= 1; got {c.ratios}")
    for name in ("context", "ppl_sequences", "batch", "passkey_trials", "mc_items", "mc_context"):
        require(c[name] >= 1, f"compare.{name} must be >= 1; got {c[name]}")
    require(c.decode_order in ("auto", "token"),
            f"compare.decode_order must be 'auto' or 'token'; got {c.decode_order!r}")
    require(1 <= c.prefix < c.context, f"compare.prefix must be in [1, compare.context={c.context}); got {c.prefix}")
    for spec in c.kv_heads:
        require(isinstance(spec, str) and spec.count(":") == 1,
                f"compare.kv_heads entries look like 'svd_a:B'; got {spec!r}")
    for spec in c.extra_models:
        require(isinstance(spec, str) and spec.count("|") == 2,
                f"compare.extra_models entries look like 'label|model source|cache method'; got {spec!r}")
