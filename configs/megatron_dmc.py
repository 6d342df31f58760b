"""Convert a Megatron-LM checkpoint (NVIDIA's Llama-2-7B-DMC-8x, -13B-DMC-4x/8x) to a Hugging Face directory.

python -m dmc_jax.main --config configs/megatron_dmc.py --config.convert.source=<Megatron dir> \
    --config.convert.tokenizer=<Llama-2 HF dir or tokenizer.model> --config.convert.output=<out dir>

Then serve or evaluate the result like any model directory, e.g. with configs/llama2_7b_dmc.py and
--config.model.source=<out dir> --config.cache.method=dmc_paged (its DMC hyper-parameters come with it).
"""

import ml_collections

from dmc_jax.weights import convert_options


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "convert_megatron"
    c.output_dir = ""        # '' = runs/convert_megatron-<timestamp>; results.json is written there
    c.seed = 0
    c.keep_freed_memory = False  # True: malloc keeps what XLA:CPU frees (dmc_jax/host_memory.py)

    c.model = ml_collections.ConfigDict()  # not read by this task (the checkpoint brings its own architecture)
    c.model.source = "megatron"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.max_seq_len = 0
    c.model.remat = False

    c.convert = convert_options.default_config()
    return c
