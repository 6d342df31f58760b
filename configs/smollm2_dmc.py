"""Retrofit SmolLM2-135M-Instruct with DMC to CR 2 on the default corpus (CPU); the main job until the eighth
session (now configs/smollm2_main.py, DMS).

python -m dmc_jax.main --config configs/smollm2_dmc.py [--config.output_dir=runs/x] [--config.dmc.target_cr=4]

Sized so the whole job (data, DMC retrofit, vanilla control, evaluation, side by side with H2O and TOVA at the CR the
DMC model reached, report) finishes in about 15 minutes on a quiet 2-core CPU: 1024 tokens per step, 4 zero-out + 24 ramp + 12 fine-tune steps. That is ~41k tokens, a demonstration of
the mechanics (the reference recipe uses ~35B tokens for CR 2), with deliberate departures from the reference
recipe that such a short run needs, all config fields: a decision offset of 2 instead of 5 (stage 2 starts at
alpha ~ 0.12 instead of 0.007), a 100x learning rate on the W_q/W_k columns of the decision channel
(dmc.decision_lr_scale: with AdamW the decision logit moves by a fixed amount per step, too little in a few dozen
steps), a compression-loss weight of 50 (the loss averages decisions over 30 layers x 3 heads x 256 tokens, so
each decision's pull is ~1/23000 while a merge's cross-entropy cost is averaged over 256 tokens only: at weight
1 the language-model gradient holds the decisions in place for the first dozens of steps) and a 10x higher base
learning rate.
The GPU configs (configs/llama2_7b_dmc_cr*.py) keep the reference values.
"""

import ml_collections

from dmc_jax.data import options as data_options
from dmc_jax.dmc.objective import default_config as dmc_default_config


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "retrofit"
    c.output_dir = ""        # '' = runs/retrofit-<timestamp>; set it to resume an interrupted job
    c.seed = 0
    c.keep_freed_memory = False  # True: malloc keeps what XLA:CPU frees (dmc_jax/host_memory.py)

    c.model = ml_collections.ConfigDict()
    c.model.source = "smollm2"
    c.model.param_dtype = "float32"
    c.model.compute_dtype = "float32"
    c.model.max_seq_len = 0
    c.model.remat = False

    c.data = data_options.default_config()
    c.data.source = "default"       # the public-domain corpus fetched by scripts/setup.sh (held-out works excluded)
    c.data.seq_len = 256
    c.data.batch_size = 4

    c.dmc = dmc_default_config()
    c.dmc.target_cr = 2.0
    c.dmc.zero_out_steps = 4
    c.dmc.retrofit_steps = 24
    c.dmc.decision_offset = 2.0     # reference: 5 (see the docstring)
    c.dmc.decision_lr_scale = 100.0  # reference: 1 (see the docstring)
    c.dmc.cr_loss_weight = 50.0     # reference: 1 (see the docstring)

    c.train = ml_collections.ConfigDict()
    c.train.objective = "dmc"
    c.train.steps = 40              # stage 3 (fine-tune at the target) = steps - zero_out - retrofit
    c.train.stages = ()             # later steps with other options (dmc_jax/training/stages.py)
    c.train.grad_accum = 1
    c.train.log_every = 4
    c.train.eval_every = 0
    c.train.eval_batches = 4
    c.train.progress = True
    c.train.tensorboard = True

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-4
    c.optim.schedule = "cosine"     # constant through the ramp, cosine during fine-tuning (as the reference)
    c.optim.warmup_steps = 2
    c.optim.hold_steps = 26
    c.optim.decay_steps = 0
    c.optim.end_lr = 3e-5
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = True
    c.optim.clip_norm = 1.0
    c.optim.freeze = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""
    c.checkpoint.every_steps = 10
    c.checkpoint.max_to_keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.resume = True
    c.checkpoint.init_from = ""     # another run's checkpoint dir or <dir>/<step>: start from its state, fresh data

    c.eval = ml_collections.ConfigDict()
    c.eval.text_files = ""          # '' = the default corpus's held-out works (never trained on)
    c.eval.window = 512
    c.eval.stride = 512
    c.eval.max_tokens = 8192
    c.eval.batch = 1

    c.retrofit = ml_collections.ConfigDict()
    c.retrofit.method = "dmc"       # the trained cache method (its section: c.dmc); see dmc_jax/cache/registry.py
    c.retrofit.control = True       # also train the vanilla control (same recipe and tokens, CR fixed at 1)
    # Step 6: the trained model through its serving cache next to H2O and TOVA at the CR it reached, decoded through
    # the caches on the same held-out text (task compare's protocol; <run>/side_by_side). () skips it.
    c.retrofit.side_by_side = ("h2o", "tova")
    c.retrofit.side_by_side_evals = ("ppl",)   # add 'passkey' for retrieval at eval.window tokens (~1 min per row)
    c.retrofit.side_by_side_sequences = 4
    c.retrofit.calibrate_threshold = False  # DMS served by dms_paged only: the pool's threshold chosen on training text
    c.retrofit.calibration_files = ""
    c.retrofit.calibration_rows = 8

    c.generate = ml_collections.ConfigDict()
    # A plain continuation: ~40k tokens of Shakespeare do not keep the instruct model's chat behaviour.
    c.generate.prompt = "ROMEO. But soft, what light through yonder window breaks?"
    c.generate.prompts_file = ""
    c.generate.chat = False
    c.generate.max_new_tokens = 64
    c.generate.temperature = 0.0
    c.generate.top_k = 0
    c.generate.top_p = 1.0
    return c
