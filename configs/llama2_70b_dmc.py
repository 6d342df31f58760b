"""Llama 2 70B DMC retrofit on H100 GPUs with the reference recipe (docs/methods/dmc.md), for CR 2, 4 or 8.

python -m dmc_jax.main --config configs/llama2_70b_dmc.py:cr4 --config.task=plan     # memory per GPU, no GPU needed
sbatch --nodes=8 launch/slurm_train.sbatch configs/llama2_70b_dmc.py:cr4 /checkpoints/llama2-70b-dmc-cr4 \\
    --config.model.source=/path/to/Llama-2-70b-hf

Same stages, batch 1024 x 4096, AdamW and LR schedule as configs/llama2_7b_dmc.py. 70B fp32 weights + AdamW + fp32
gradients are 1.1 TB, so they are split over all 64 GPUs: tensor = 8 inside a node (NVLink: heads, KV heads, MLP,
vocabulary) and fsdp = 8 across the nodes (one all-gather / reduce-scatter of each layer's bf16 shard per
micro-batch over InfiniBand). DMC with GQA (8 KV heads): one KV head per GPU. Full remat: each layer keeps only
its input; 2 rows per GPU per micro-batch.
Planner (task plan, cr4): 36.9 GiB per GPU analytic, 35.8 GiB in XLA's memory analysis of the step compiled for
64 fake CPU devices (weights 4.0, AdamW 8.0, gradients 8.0, saved layer inputs 10.0 GiB): fits in 80 GB.
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
    c.model.source = "meta-llama/Llama-2-70b-hf"  # a local Hugging Face directory (config.json + safetensors)
    c.model.remat_policy = "full"
    c.mesh.data = 1
    c.mesh.fsdp = -1                              # the nodes (8 with 64 GPUs)
    c.mesh.tensor = 8                             # the GPUs of a node
    c.train.grad_accum = 64                       # 16 rows per micro-batch over 8 fsdp shards: 2 rows per GPU
    c.checkpoint.every_steps = 100                # a 70B step is slow: lose less on a node failure
    c.plan.devices = 64                           # 8 nodes x 8 H100 80 GB
    return c
