"""Up-trained GQA by distillation (issue 14's "the same for up-trained GQA"): SmolLM2-135M-Instruct converted to
fewer KV heads (task convert_kv_heads), then trained to match the original 3-KV-head model's next-token
distributions, on the DMS and DMC distillation recipes' tokens (250 steps x 4 x 256 = 256k, recall rows on).

python -m dmc_jax.main --config configs/smollm2.py --config.task=convert_kv_heads --config.kv_heads.method=svd_a \\
    --config.kv_heads.rope=B --config.kv_heads.new_kv_heads=1 --config.output_dir=runs/gqa      # 3 -> 1: CR 3
python -m dmc_jax.main --config configs/smollm2_gqa_distill.py --config.model.source=runs/gqa/model \\
    --config.output_dir=runs/gqa/distill --config.train.export_dir=runs/gqa/distilled

Against the README's earlier up-training (40 steps of plain LM loss at lr 3e-4: 1168 / 179.65 perplexity from the
mean / SVD-a inits), the teacher is the ORIGINAL model (distill.teacher='smollm2'; '' would be the converted
student itself), the loss its forward KL, every weight at a constant 1e-4 (the K/V projections must move, so
no frozen or slowed base), 250 steps.
"""

import os

from dmc_jax.config_loader import load_config_file
from dmc_jax.model import cpu_features
from dmc_jax.training import distill


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_train.py"))
    c.model.source = ""             # the converted model's directory (required)
    c.model.compute_dtype = cpu_features.default_compute_dtype()  # bf16 only where the CPU has bf16 matmuls
    c.train.steps = 250
    c.train.eval_every = 50
    distill.apply_recipe(c, base_lr_scale=1.0)  # KL, every weight at 1e-4 constant, recall rows
    c.distill.teacher = "smollm2"   # the original model, with its 3 KV heads
    c.checkpoint.every_steps = 50
    return c
