"""The embedded default main job: retrofit SmolLM2-135M-Instruct with DMS (learned delayed eviction) to CR 8 by
distillation, then put it next to H2O and TOVA at the CR it reached and at its bytes (~15-19 minutes on a 2-core CPU
with bf16 matmuls; README "The main job").

python -m dmc_jax.main --config configs/smollm2_main.py [--config.output_dir=runs/x] [--config.train.steps=N]

Task retrofit with retrofit.method='dms' (the DMC main job of earlier versions: configs/smollm2_dmc.py):
    1. held-out perplexity of the original model (Macbeth and Twelfth Night, never trained on);
    2. the DMS retrofit (configs/smollm2_dms.py's recipe, shortened: forward KL to the frozen original model
       computed in the same step, the decision columns of W_q at lr 1e-4 and the rest at lr x 0.1 but the
       embedding, which stays frozen, the CR target ramped 1 -> 8 over dms.ramp_steps, recall rows in the data)
       -> <run>/dms, model in <run>/dms/model;
    3. held-out perplexity and CR with hard decisions (exactly what the cache keeps); the serving threshold chosen
       on training text so that what the model keeps fills the serving pool (dms/calibrate.py); a generation
       through the paged DMS cache with its bytes, report.md, cr_heatmap.png;
    4. side by side (task compare's protocol, 512-token held-out sequences decoded token by token through each
       cache, passkey at 512 tokens): the DMS model in a paged pool of H2O's CR-8 bytes next to H2O and TOVA at the
       CR it reached and at the CR its bytes correspond to -> <run>/side_by_side.

Why DMS at CR 8 and this recipe (README "Learned compression by distillation"): DMS is the method that learns
enough in CPU minutes (tens of thousands of tokens reach DMC's CR but lose to eviction by 58% at CR 2.5); the
distillation target keeps the model the original model instead of drifting to Shakespeare; CR 8 is where eviction
hurts most and the learned policy's lead is widest (seventh session: 34.74 against StreamingLLM 35.27, TOVA 36.44,
H2O 38.52; passkey 0.58 against 0.17); the window of 16 lets the 512-token evaluation see evictions (the reference's
512 would evict nothing at 512 tokens). Compute: bf16 matmuls where the CPU is fast at them (AMX-BF16 or
AVX512-BF16; fp32 master weights and gradients), fp32 elsewhere, where the job takes about twice as long.
"""

import os

from dmc_jax.cache import registry as cache_registry
from dmc_jax.config_loader import load_config_file
from dmc_jax.dms.objective import default_config as dms_default_config
from dmc_jax.model import cpu_features
from dmc_jax.training import distill


def get_config():
    c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2_dmc.py"))
    del c.dmc
    c.model.compute_dtype = cpu_features.default_compute_dtype()  # bf16 only where the CPU has bf16 matmuls
    # malloc keeps what XLA frees (dmc_jax/host_memory.py): steps ~15% faster, peak host memory ~13 GB instead of
    # ~8.5 (README "The main job"); --config.keep_freed_memory=False on a machine with less than ~16 GB
    c.keep_freed_memory = True
    c.retrofit.method = "dms"
    c.retrofit.control = False      # DMS has no vanilla control: the distillation target is the original itself
    c.retrofit.side_by_side_evals = ("ppl", "passkey")
    # After training, the serving pool's threshold is chosen on training text so that what the model keeps fills the
    # pool (dms/calibrate.py): training overshoots its CR target (the loss is one-sided), leaving bytes idle.
    c.retrofit.calibrate_threshold = True
    c.retrofit.calibration_files = ""   # '' = the default corpus's training works (never the held-out ones)
    c.retrofit.calibration_rows = 8

    c.train.objective = "dms"
    c.train.steps = 200             # 250 decode 2% better (34.04 vs 34.84) but take ~18 minutes (README "The main job")
    c.train.log_every = 5

    c.dms = dms_default_config()
    c.dms.target_cr = 8.0
    c.dms.ramp_steps = 150
    c.dms.window = 16               # reference 512: nothing would leave the window at 512 tokens
    c.dms.cr_loss_weight = 10.0     # reference 1: a short run must reach its target
    c.dms.decision_channel = 20     # reference: the last; on SmolLM2 zeroing q[20] costs 0.006 nats (smollm2_dms.py)

    # forward KL to the original, base at lr x 0.1, decision columns at lr 1e-4 (constant), recall rows
    distill.apply_recipe(c, base_lr_scale=0.1)
    # The embedding (input table and tied output projection, 21% of the weights) stays the original's: no gradient,
    # no optimizer state; a step takes 3.2 s instead of 3.55. Freezing the MLPs too (2.65 s) lost the passkey to
    # TOVA (README "The main job").
    c.optim.freeze = ("embed",)
    c.checkpoint.every_steps = 100  # a save writes 1.6 GB (weights and Adam moments) and stalls a step by ~7 s

    # The serving cache of the side by side and the generation sample: one pool shared by every head, sized as
    # H2O's 64 slots per head at CR 8 for 512 tokens (ceil((512 - 17) / 10.6) + 17 = 64 slots per head, pages of
    # 4); a prompt or decode step that needs more forces out the marked tokens closest to leaving, counted.
    c.cache = cache_registry.default_config()
    c.cache.method = "dms_paged"
    c.cache.dms_paged.target_cr = 10.6
    c.cache.dms_paged.margin = 1.0
    c.cache.dms_paged.page_size = 4
    # A prompt keeps, in every head, as many tokens as DMS's own pass would (the same pages), the older ones chosen
    # by the last prompt token's attention (docs/methods/dms.md, "Prompt rule"; at 2k CR 8: 168 of 192 passkeys
    # against 70 with DMS's own rule, README "Nineteenth session").
    c.cache.dms_paged.prompt = "query"
    c.cache.dms.prompt = "query"  # recorded in the model's kv_method.json (the 'dms' section), so serving it says so
    c.cache.dms_paged.on_overflow = "evict"
    return c
