"""Llama 3 8B DMC retrofit on GPUs with the reference recipe (docs/methods/dmc.md), for CR 2, 4 or 8
(configs/llama2_7b_dmc.py).

python -m dmc_jax.main --config configs/llama3_8b_dmc.py:cr4 --config.model.source=/path/to/Meta-Llama-3-8B \\
    --config.output_dir=/checkpoints/llama3-8b-dmc-cr4
sbatch --nodes=2 launch/slurm_train.sbatch configs/llama3_8b_dmc.py:cr4 /checkpoints/llama3-8b-dmc-cr4 ...

Same stages, optimizer and tokens per step (4M) as Llama 2 7B, at Llama 3's 8192 context: 512 x 8192. GQA (8 KV
heads): DMC decides per KV head with the importance averaged over the group. The 128K vocabulary makes the fp32
logits large ([rows, 8192, 128256] x 4 bytes = 4.2 GB per row), so one row per GPU per micro-batch, with the
vocabulary split over tensor=2. Planned for 2 nodes x 8 H100.
"""

import importlib.util
import os


def _base(variant: str):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama2_7b_dmc.py")
    spec = importlib.util.spec_from_file_location("_llama2_7b_dmc", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(variant: str = "cr4"):
    c = _base(variant)                            # the recipe: stages, LR, optimizer, checkpoints
    c.model.source = "meta-llama/Meta-Llama-3-8B"  # a local Hugging Face directory (config.json + safetensors)
    c.model.max_seq_len = 8192
    c.data.seq_len = 8192
    c.data.batch_size = 512                       # 4M tokens per step, as the 7B recipe
    c.mesh.data = -1
    c.mesh.fsdp = 4
    c.mesh.tensor = 2                             # heads, KV heads, MLP and vocabulary split in pairs of GPUs
    c.train.grad_accum = 64                       # 8 rows per micro-batch over 8 batch shards: 1 row per GPU
    c.plan.devices = 16
    return c
