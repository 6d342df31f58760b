"""Llama 2 7B DMC retrofit on GPUs with the reference recipe (docs/methods/dmc.md), for CR 2, 4 or 8.

python -m dmc_jax.main --config configs/llama2_7b_dmc.py:cr4 --config.model.source=/path/to/Llama-2-7b-hf \\
    --config.output_dir=/checkpoints/llama2-7b-dmc-cr4
launch/slurm_train.sbatch runs the same command on every GPU of a cluster (one process per GPU).

Recipe: stage 1 zero-out 250 steps; stage 2 6000 steps with the CR target ramping 1 -> CR* at a constant 3e-5;
stage 3 2000 steps, cosine 3e-5 -> 3e-6; global batch 1024 x 4096 tokens; AdamW (0.9, 0.95), weight decay 0.1,
clip 1.0; bf16 compute with fp32 master weights. The paper needs more tokens for higher ratios (about 2% of the
pretraining data for 2x, 8% for 8x): the ramp grows with the target here (stage 2 = 3000 x CR steps).
Data: a TFDS catalog dataset (needs internet to prepare once) or a directory of text files.
"""

import ml_collections

from dmc_jax.data import options as data_options
from dmc_jax.dmc.objective import default_config as dmc_default_config
from dmc_jax.tasks.plan import default_config as plan_default_config
from dmc_jax.training.distributed import default_config as distributed_default_config

VARIANTS = {"cr2": 2.0, "cr4": 4.0, "cr8": 8.0}


def get_config(variant: str = "cr4"):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {variant!r}")
    cr = VARIANTS[variant]
    c = ml_collections.ConfigDict()
    c.task = "train"
    c.output_dir = ""
    c.seed = 0
    c.keep_freed_memory = False  # True: malloc keeps what XLA:CPU frees (dmc_jax/host_memory.py)

    c.model = ml_collections.ConfigDict()
    c.model.source = "meta-llama/Llama-2-7b-hf"   # a local Hugging Face directory (config.json + safetensors)
    c.model.param_dtype = "float32"               # fp32 master weights
    c.model.compute_dtype = "bfloat16"
    c.model.max_seq_len = 4096
    c.model.remat = True
    c.model.remat_policy = "full"                 # none | full | dots | dots_with_no_batch_dims (model/remat.py)

    c.data = data_options.default_config()
    c.data.source = "tfds:c4/en:3.1.0"
    c.data.seq_len = 4096
    c.data.batch_size = 1024                      # global rows per optimizer step

    c.dmc = dmc_default_config()                  # reference conventions: last channel, offset 5, tau 0.1, w 12
    c.dmc.target_cr = cr
    c.dmc.zero_out_steps = 250
    c.dmc.retrofit_steps = int(3000 * cr)

    c.train = ml_collections.ConfigDict()
    c.train.objective = "dmc"
    c.train.steps = c.dmc.zero_out_steps + c.dmc.retrofit_steps + 2000
    c.train.stages = ()             # later steps with other options (dmc_jax/training/stages.py)
    c.train.grad_accum = 16                       # micro-batches per step; tune to the memory planner
    c.train.offload_opt_state = False             # True: AdamW state in pinned host memory between steps
    c.train.log_every = 10
    c.train.eval_every = 500
    c.train.eval_batches = 32
    c.train.progress = True
    c.train.tensorboard = True

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-5
    c.optim.schedule = "cosine"
    c.optim.warmup_steps = 0
    c.optim.hold_steps = c.dmc.zero_out_steps + c.dmc.retrofit_steps   # constant through stages 1 and 2
    c.optim.decay_steps = 0
    c.optim.end_lr = 3e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = True
    c.optim.clip_norm = 1.0
    c.optim.freeze = ()

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""
    c.checkpoint.every_steps = 250
    c.checkpoint.max_to_keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.resume = True
    c.checkpoint.init_from = ""     # another run's checkpoint dir or <dir>/<step>: start from its state, fresh data

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1                               # the rest of the devices
    c.mesh.fsdp = 8                                # shard params / optimizer state within a node
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1                            # nodes an axis spans in a hybrid mesh; 1 each = devices in
    c.mesh.dcn_fsdp = 1                            # process order, the last axes inside a node, which is what
    c.mesh.dcn_tensor = 1                          # these meshes want
    c.mesh.rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
                    ("kv_heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("head_dim", None))

    c.distributed = distributed_default_config()   # SLURM / launcher detection (dmc_jax/training/distributed.py)
    c.plan = plan_default_config()                 # --config.task=plan: memory per GPU (dmc_jax/tasks/plan.py)
    c.plan.devices = 64                            # the cluster planned for: 8 nodes x 8 H100 (1 row per GPU)
    return c
