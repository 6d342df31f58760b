"""Llama 2 13B DMC retrofit on GPUs with the reference recipe (docs/methods/dmc.md), for CR 2, 4 or 8
(configs/llama2_7b_dmc.py).

python -m dmc_jax.main --config configs/llama2_13b_dmc.py:cr4 --config.model.source=/path/to/Llama-2-13b-hf \\
    --config.output_dir=/checkpoints/llama2-13b-dmc-cr4
sbatch --nodes=4 launch/slurm_train.sbatch configs/llama2_13b_dmc.py:cr4 /checkpoints/llama2-13b-dmc-cr4 ...
Memory per GPU first: --config.task=plan (plan.devices = the cluster's GPU count).

Same three stages, batch 1024 x 4096, AdamW and LR schedule as 7B. Mesh: FSDP over the 8 GPUs of a node (13B fp32
weights + AdamW + gradients = 208 GB, 26 GB per GPU), data parallel across nodes; planned for 4 nodes x 8 H100.
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
    c = _base(variant)                            # the recipe: stages, LR, batch, optimizer, checkpoints
    c.model.source = "meta-llama/Llama-2-13b-hf"  # a local Hugging Face directory (config.json + safetensors)
    c.mesh.data = -1
    c.mesh.fsdp = 8
    c.mesh.tensor = 1
    c.train.grad_accum = 32                       # 32 rows per micro-batch over 32 GPUs: 1 row per GPU
    c.plan.devices = 32
    return c
