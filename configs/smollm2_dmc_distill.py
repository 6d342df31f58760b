"""DMC retrofit of SmolLM2-135M-Instruct to CR 4 by distillation (issue 14's "DMC recipe redone with distillation"):
the DMS main job's training recipe applied to DMC's append-or-merge decisions, so the two learned methods are
compared on equal terms (same corpus, tokens, teacher, learning rates, recall rows, evaluation).

python -m dmc_jax.main --config configs/smollm2_dmc_distill.py [--config.output_dir=runs/x] [--config.dmc.target_cr=8]

What changes against configs/smollm2_dmc.py (the 40-step LM-loss demonstration whose models drift to Shakespeare):
    loss       forward KL to the frozen original model computed in the same step (training/distill.py), no LM term;
    base       every non-decision weight at lr x 0.1 (1e-5), the decision columns of W_q/W_k at 1e-4 x
               dmc.decision_lr_scale (100, as the LM-loss recipe: at 10 the CR lagged the ramp from its start);
    channel    the decision channel is q/k channel 20, as the DMS recipe's (zeroing the last channel, the
               reference's, cost 0.36-0.75 nats of KL in the zero-out stage here; q[20] costs 0.006 for DMS);
    schedule   zero-out 10 steps, CR target ramped 1 -> 4 over 150 steps, 90 steps at the target (250 steps of
               4 x 256 tokens = 256k tokens, the DMS main job's budget), constant learning rate;
    data       half of the rows carry two facts restated later (data/recall.py), as in the DMS recipe;
    evaluation held-out perplexity with the paged DMC cache, side by side with H2O and TOVA at the CR reached and at
               the bytes, perplexity and passkey (512 tokens), as the main job.
"""

import os

from dmc_jax.config_loader import load_config_file
from dmc_jax.model import cpu_features
from dmc_jax.training import distill


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_dmc.py"))
    c.model.compute_dtype = cpu_features.default_compute_dtype()  # bf16 only where the CPU has bf16 matmuls
    c.retrofit.control = False      # the distillation target is the original model itself
    c.retrofit.side_by_side_evals = ("ppl", "passkey")

    c.dmc.target_cr = 4.0
    c.dmc.zero_out_steps = 10
    c.dmc.retrofit_steps = 150
    c.dmc.decision_lr_scale = 100.0
    c.dmc.decision_channel = 20
    c.train.steps = 250
    c.train.log_every = 5

    distill.apply_recipe(c, base_lr_scale=0.1)  # the DMS main job's: KL, base x 0.1, 1e-4 constant, recall rows
    c.checkpoint.every_steps = 20
    return c
