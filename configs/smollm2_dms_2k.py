"""The 2k-token DMS recipe at CR 8 as one run from the original SmolLM2-135M-Instruct (train.stages): the model
README "Learned compression" serves at 2,048 tokens.

python -m dmc_jax.main --config configs/smollm2_dms_2k.py --config.output_dir=runs/dms_2k

configs/smollm2_dms.py's distillation recipe (forward KL to the frozen original model in the same step, decision
columns of W_q at lr 1e-4, the rest at lr x 0.1, recall rows) with the CR-8 target, in three stages, each a run of
its own in <output_dir>/stage<i> that resumes (the same command again) and starts from the previous stage's last
checkpoint (dmc_jax/training/stages.py):

    stage 0, steps   1-250: 4 rows of 256 tokens, window 16, the CR target ramped 1 -> 8 over 150 steps
    stage 1, steps 251-350: 1 row of 2,048 tokens (long rows: the 2k protocol's context)
    stage 2, steps 351-390: the serving window, 64 (the model learns what stays visible in that window)

543k tokens. On the 2-core CPU with bf16 matmuls: ~17 min + ~38 + ~15 of steps alone (about 70 minutes). The
runs behind README's 2k CR-8 rows ran these stages as three commands (runs/dms_cr8, runs/dms_cr8_2k,
runs/dms_cr8_2k_w64). A fourth stage with recall facts anywhere in the row (data.recall_span=0.95,
data.recall_facts=3, 40 steps) did not find more passkeys (README). The model: train.export_dir (default
<output_dir>/model). Then calibrate the serving threshold for the pool and evaluate (README "Learned compression",
2k protocol):

    python benchmarks/dms_thresholds.py --model runs/dms_2k/model --calibrate 250 --window 64 --tokens 2048

Run to the end (fifteenth session): decoded 2k perplexity 29.59 at CR 8.17 (the three-command model 29.51; H2O
31.21), passkey 5 of 48 (the three-command model 11, TOVA 11): README "The 2k recipe as one run".
"""

import os

from dmc_jax.config_loader import load_config_file


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_dms.py"))
    c.model.compute_dtype = "bfloat16"   # AMX-BF16 / AVX512-BF16 CPUs and GPUs; 'float32' elsewhere (twice as slow)
    c.output_dir = "runs/dms_2k"
    c.dms.target_cr = 8.0
    c.dms.ramp_steps = 150
    c.checkpoint.max_to_keep = 3
    c.train.progress = False
    c.train.steps = 390
    c.train.stages = (
        "250",
        "350 data.seq_len=2048 data.batch_size=1",
        "390 dms.window=64",
    )
    c.train.export_dir = c.get_ref("output_dir") + "/model"   # follows --config.output_dir
    return c
