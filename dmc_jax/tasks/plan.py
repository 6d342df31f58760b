"""Task `plan`: per-device memory of the sharded train step for a model and mesh, without allocating either.

    python -m dmc_jax.main --config configs/llama2_70b_dmc.py:cr4 --config.task=plan [--config.plan.devices=64]

Two numbers side by side, per device:
  analytic   fp32 master weights, AdamW mu + nu and fp32 gradients sharded by the mesh rules (and a distillation
             teacher's weights in the compute dtype, sharded the same way, with its logits); the activations each
             layer keeps for the backward pass under model.remat_policy; then the larger of one layer's backward
             (recomputation, attention scores [b, H, T, T], all-gathered weights) and the fp32 logits' backward
  compiled   XLA's memory analysis of the jitted step (parameters and the batch as ShapeDtypeStructs; nothing is
             allocated): arguments, outputs, temporaries, donated aliases; peak = arguments + outputs - aliases +
             temporaries. Without enough real devices the step is compiled for CPU in a subprocess with
             --xla_force_host_platform_device_count=N fake devices: the same SPMD partitioning (shardings,
             collectives) as the cluster, but XLA:CPU's fusion and buffer assignment, which on a GPU differ (bf16 is
             kept in fewer places on CPU, so CPU temporaries are an upper bound of the GPU's in our measurements).
The report says whether the peak fits in plan.hbm_gb (minus plan.reserve_gb for the runtime and NCCL buffers).

Shape letters: b rows per device per micro-batch, T sequence, D width, H/K heads per device, V vocab, L layers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections

from dmc_jax.data import options as data_options
from dmc_jax.errors import UserError
from dmc_jax.model.architectures import ARCHITECTURES, SOURCE_NAMES
from dmc_jax.model.config import DTYPES, ModelConfig
from dmc_jax.model.remat import policy_name

GIB = 1024 ** 3
def default_config() -> ml_collections.ConfigDict:
    """The `plan` config section."""
    return ml_collections.ConfigDict(dict(
        arch="",            # a name in ARCHITECTURES, 'embed_dim=..,num_layers=..' overrides, or '' = from model.source
        devices=0,          # devices of the planned cluster (needed when a mesh size is -1); 0 = the mesh product
        hbm_gb=80.0,        # memory per device (H100 SXM: 80 GB)
        reserve_gb=4.0,     # kept free for the CUDA context, NCCL buffers, fragmentation
        compile=True,       # also compile the step and read XLA's memory analysis
        timeout_s=1800,     # for the compile subprocess
    ))


def _section(config) -> ml_collections.ConfigDict:
    c = default_config()
    if "plan" in config:
        c.update(config.plan.to_dict())
    return c


def validate(config) -> None:
    p = _section(config)
    if p.devices < 0:
        raise UserError(f"plan.devices must be >= 0 (0 = the product of the mesh sizes); got {p.devices}")
    if not p.hbm_gb > 0 or p.reserve_gb < 0 or p.reserve_gb >= p.hbm_gb:
        raise UserError(f"plan.hbm_gb must be > 0 and 0 <= plan.reserve_gb < hbm_gb; got {p.hbm_gb}, "
                        f"{p.reserve_gb}")
    sizes = [config.mesh[a] for a in ("data", "fsdp", "tensor")] if "mesh" in config else [1, 1, 1]
    if -1 in sizes and not p.devices:
        raise UserError("a mesh size is -1 (the rest of the devices), so set plan.devices to the planned cluster's "
                        "device count (e.g. 64 for 8 nodes x 8 GPUs)")
    architecture(config)


def architecture(config) -> ModelConfig:
    """The ModelConfig to plan: plan.arch, a local Hugging Face directory, or a known name in model.source."""
    p, m = _section(config), config.model
    name, overrides = p.arch, {}
    if "=" in name:  # 'llama2_7b,num_layers=4' or 'embed_dim=256,...' (on top of tiny)
        parts = name.split(",")
        name = next((x for x in parts if "=" not in x), "tiny")
        try:
            overrides = {k: (float(v) if "." in v else int(v)) for k, v in (x.split("=") for x in parts if "=" in x)}
        except ValueError:
            raise UserError(f"plan.arch overrides must be name=number; got {p.arch!r}") from None
    if not name:
        source = str(m.source)
        if os.path.isfile(os.path.join(source, "config.json")):
            from dmc_jax.weights.hf_io import load_hf_config

            cfg = load_hf_config(source)
            return _with_run_fields(cfg, config)
        low = source.lower().rstrip("/").rsplit("/", 1)[-1].replace("-hf", "").removeprefix("meta-")
        name = "tiny" if source == "tiny" else SOURCE_NAMES.get(low, "")
        if not name:
            raise UserError(f"cannot tell the architecture of model.source={source!r} without its config.json; set "
                            f"plan.arch to one of {', '.join(sorted(ARCHITECTURES))}")
    if name not in ARCHITECTURES:
        raise UserError(f"plan.arch must be one of {', '.join(sorted(ARCHITECTURES))}; got {name!r}")
    try:
        return _with_run_fields(ModelConfig(**{**ARCHITECTURES[name], **overrides}), config)
    except TypeError as e:
        raise UserError(f"plan.arch overrides name an unknown ModelConfig field: {e}") from None


def _with_run_fields(cfg: ModelConfig, config) -> ModelConfig:
    m = config.model
    return cfg.replace(param_dtype=m.param_dtype, compute_dtype=m.compute_dtype, remat=bool(m.remat),
                       remat_policy=m.get("remat_policy", ""), max_seq_len=m.max_seq_len or cfg.max_seq_len)


def mesh_sizes(config) -> dict:
    """{'data', 'fsdp', 'tensor'} with -1 resolved against plan.devices."""
    sizes = {a: (config.mesh[a] if "mesh" in config else 1) for a in ("data", "fsdp", "tensor")}
    known = math.prod(v for v in sizes.values() if v != -1)
    for a, v in sizes.items():
        if v == -1:
            sizes[a] = max(_section(config).devices // known, 1)
    return sizes


# ---------------------------------------------------------------------------------------------------------- analytic

def _shards(cfg: ModelConfig, sizes: dict, rules) -> dict:
    """Parameter path -> (elements, number of devices it is split over), from the same rules as training."""
    from dmc_jax.model.params import param_shapes

    out = {}
    for path, (shape, axes) in param_shapes(cfg).items():
        used, split = set(), 1
        for name, size in zip(axes, shape):
            mesh_axes = [a for a in _rule(rules, name) if a not in used and sizes[a] > 1]
            n = math.prod(sizes[a] for a in mesh_axes)
            if mesh_axes and size % n == 0:
                used.update(mesh_axes)
                split *= n
        out[path] = (math.prod(shape), split)
    return out


def _rule(rules, name) -> tuple:
    for logical, axes in rules:
        if logical == name:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return ()


def analytic(cfg: ModelConfig, config) -> dict:
    """Per-device bytes of each part of the train step (see the module docstring), and their sum 'peak'."""
    from dmc_jax.training.loop import mesh_options

    sizes = mesh_sizes(config)
    _, rules = mesh_options(config)
    shards = _shards(cfg, sizes, rules)
    f32, c = 4, jnp.dtype(DTYPES[cfg.compute_dtype]).itemsize
    params = sum(n * f32 / s for n, s in shards.values())
    t = config.train
    batch_axes = [a for a in _rule(rules, "batch") if sizes[a] > 1]
    batch_split = math.prod(sizes[a] for a in batch_axes)
    rows = config.data.batch_size // t.grad_accum  # rows of one micro-batch, all devices
    b = max(rows // batch_split, 1)  # rows per device (a batch axis that does not divide is replicated)
    T, D, L, V = config.data.seq_len, cfg.embed_dim, cfg.num_layers, cfg.vocab_size
    tp = sizes["tensor"]
    H = cfg.num_heads // tp if cfg.num_heads % tp == 0 else cfg.num_heads
    K = cfg.num_kv_heads // tp if cfg.num_kv_heads % tp == 0 else cfg.num_kv_heads
    F = cfg.mlp_dim // tp if cfg.mlp_dim % tp == 0 else cfg.mlp_dim
    Dh = cfg.head_dim
    Vt = V // tp if V % tp == 0 else V
    from dmc_jax.cache import registry

    # A trained cache method's training form (DMC's) adds a [b, K, T, T] mask and fp32 partial accumulations.
    dmc = registry.trained(config.train.objective) is not None
    layer_elems = {k: v for k, v in shards.items() if k.startswith("layers/")}
    # One layer's weights in the compute dtype after the all-gather over fsdp (still split over tensor).
    gathered = sum(n / L / max(s // sizes["fsdp"], 1) if s % sizes["fsdp"] == 0 else n / L / s
                   for n, s in layer_elems.values()) * c
    btd = b * T * D * c
    # Per layer, what the backward pass reads from the forward pass when nothing is recomputed (compute dtype c;
    # attention scores in fp32): x, norm(x), x + attention, norm of that; q, k, v, attention output and rotated
    # q, k; gate, up, silu(gate), their product; the [b, H, T, T] scores, masked scores, probabilities (fp32) and
    # their compute-dtype copy. DMC adds its merge penalty [b, K, T, T] and the fp32 partial accumulations.
    proj = b * T * (2 * H * Dh + 2 * K * Dh) * c
    rope = b * T * (H + K) * Dh * c
    mlp = b * T * 4 * F * c
    score = b * H * T * T * f32
    scores = 3 * score + b * H * T * T * c
    dmc_extra = (b * K * T * T * f32 + b * T * K * Dh * 2 * f32) if dmc else 0
    everything = 4 * btd + proj + rope + mlp + scores + dmc_extra
    policy = policy_name(cfg.remat, cfg.remat_policy)
    dots = 2 * btd + proj + 3 * b * T * F * c  # projections, MLP matmuls, residual stream
    kept_per_layer = {"none": everything, "full": btd, "dots": dots + score,
                      "dots_with_no_batch_dims": dots}[policy]
    saved = L * kept_per_layer
    # Backward of one layer: its recomputed activations, the scores' gradients, the gathered weights and their
    # gradients. The logits' backward (logits, softmax, gradient in fp32) comes before the layers' and does not
    # overlap it, so the peak holds the larger of the two.
    layer_work = everything + 2 * score + 2 * gathered
    # Distillation (a distill section whose loss is not 'lm'): the frozen teacher's weights in the compute dtype,
    # sharded like the student's (a teacher from another source is taken to have the student's shape), and its fp32
    # logits and log-probabilities next to the student's.
    distills = "distill" in config and config.distill.get("loss", "lm") != "lm"
    teacher = params / f32 * c if distills else 0
    logits = b * T * Vt * f32 * (5 if distills else 3)
    grads = params * (2 if t.grad_accum > 1 else 1)  # fp32 gradient (+ the accumulator of the micro-batches)
    batch = 3 * (config.data.batch_size // batch_split) * T * 4
    out = {"params": params, "opt_state": 2 * params, "grads": grads, "activations_saved": saved,
           "layer_backward": layer_work, "logits": logits, "batch": batch, "teacher": teacher}
    out["peak"] = params * 3 + grads + batch + teacher + saved + max(layer_work, logits)
    if t.get("offload_opt_state", False):  # mu, nu on the host; on the device only during the update
        out["peak"] = params + grads + batch + teacher + max(saved + max(layer_work, logits), 2 * params)
    out.update(remat_policy=policy, rows_per_device=b, mesh=sizes)
    return out


# ---------------------------------------------------------------------------------------------------------- compiled

def compile_memory(config) -> dict:
    """XLA's memory analysis of the train step on this process's devices (nothing allocated)."""
    import jax
    import jax.numpy as jnp

    from dmc_jax.model.params import param_shapes, unflatten
    from dmc_jax.training import loop
    from dmc_jax.training.objective import make_objective

    cfg = architecture(config)
    sizes = mesh_sizes(config)
    n = math.prod(sizes.values())
    if jax.device_count() < n:
        raise UserError(f"the mesh needs {n} devices, this process has {jax.device_count()}")
    config = config.copy_and_resolve_references()
    config.mesh.update(sizes)
    params = unflatten({p: jax.ShapeDtypeStruct(shape, cfg.pdtype) for p, (shape, _) in param_shapes(cfg).items()})
    objective = make_objective(config.train.objective, config, cfg)
    frozen_shapes = getattr(objective, "frozen_shapes", None)  # a distillation teacher: a step argument too
    frozen = frozen_shapes(params) if frozen_shapes is not None else None
    s = loop.setup(config, cfg, params, objective, devices=jax.devices()[:n], frozen=frozen)
    state = s.abstract_state(params)
    extra = () if frozen is None else (jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
                                                    frozen, s.frozen_shardings),)
    B, T = config.data.batch_size, config.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=s.batch_sharding)
             for k in ("tokens", "segment_ids", "positions")}
    if data_options.has_loss_weights(config.data):  # recall rows with data.recall_weight
        batch["loss_weights"] = jax.ShapeDtypeStruct((B, T), jnp.float32, sharding=s.batch_sharding)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=s.replicated)
    compiled = s.train_step.lower(state["params"], state["opt_state"], batch, state["rng"], step, *extra).compile()
    ma = compiled.memory_analysis()
    out = {k: int(getattr(ma, f"{k}_size_in_bytes", 0) or 0) for k in ("argument", "output", "alias", "temp",
                                                                         "generated_code", "host_temp")}
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    out["platform"] = jax.devices()[0].platform
    out["devices"] = n
    return out


def _compile_in_subprocess(config, n: int, timeout: int) -> dict:
    """compile_memory in a fresh CPU process with n fake devices."""
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=" ".join([f for f in os.environ.get("XLA_FLAGS", "").split()
                                   if "host_platform_device_count" not in f]
                                  + [f"--xla_force_host_platform_device_count={n}"]))
    for name in ("DMC_JAX_COORDINATOR", "DMC_JAX_NUM_PROCESSES", "DMC_JAX_PROCESS_ID"):
        env.pop(name, None)
    code = "import sys; from dmc_jax.tasks.plan import _child; _child()"
    try:
        proc = subprocess.run([sys.executable, "-c", code], input=config.to_json(), env=env, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"compiling the step for {n} CPU devices took over plan.timeout_s={timeout} s; set "
                        f"plan.compile=False for the analytic estimate alone") from None
    lines = [x for x in proc.stdout.splitlines() if x.startswith("memory ")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        raise UserError(f"compiling the step for {n} CPU devices failed: {tail}")
    return json.loads(lines[-1][len("memory "):])


def _child() -> None:
    config = ml_collections.ConfigDict(json.loads(sys.stdin.read()))
    print("memory " + json.dumps(compile_memory(config)), flush=True)


def compiled(config) -> dict:
    """compile_memory here if this process has the devices (and they are accelerators), else on fake CPU devices."""
    import jax

    n = math.prod(mesh_sizes(config).values())
    if jax.device_count() >= n and jax.devices()[0].platform != "cpu":
        return compile_memory(config)
    return _compile_in_subprocess(config, n, int(_section(config).timeout_s))


# ---------------------------------------------------------------------------------------------------------- task

def _worst(config, est: dict, comp: dict | None) -> float:
    """The larger peak of the two estimates (the CPU compile's when it counts offloaded state as device memory
    is left out)."""
    cpu_counts_host = comp and comp["platform"] == "cpu" and config.train.get("offload_opt_state", False)
    return max(est["peak"], comp["peak"] if comp and not cpu_counts_host else 0)


def report(cfg: ModelConfig, config, est: dict, comp: dict | None) -> str:
    p = _section(config)
    unit, size = ("GiB", GIB) if est["peak"] >= GIB else ("MiB", 1024 ** 2)
    budget = (p.hbm_gb - p.reserve_gb) * 1e9
    n = math.prod(est["mesh"].values())
    lines = [f"plan: {cfg.num_params() / 1e9:.2f}B parameters, {cfg.num_layers} layers, objective "
             f"{config.train.objective}, mesh {est['mesh']} ({n} devices), batch {config.data.batch_size} x "
             f"{config.data.seq_len} in {config.train.grad_accum} micro-batches ({est['rows_per_device']} rows per "
             f"device), remat {est['remat_policy']}, compute {cfg.compute_dtype}",
             f"per device ({unit})                analytic"]
    host = config.train.get("offload_opt_state", False)
    for k in ("params", "opt_state", "grads", "activations_saved", "layer_backward", "logits", "batch") + (
            ("teacher",) if est["teacher"] else ()):
        label = f"{k} (host between steps)" if k == "opt_state" and host else k
        lines.append(f"  {label:<28}{est[k] / size:10.2f}")
    lines.append(f"  {'peak':<28}{est['peak'] / size:10.2f}   (sum; only the larger of layer_backward, logits)")
    if comp:
        lines.append(f"compiled on {comp['devices']} {comp['platform']} devices ({unit}): arguments "
                     f"{comp['argument'] / size:.2f}, outputs {comp['output'] / size:.2f}, donated aliases "
                     f"{comp['alias'] / size:.2f}, temporaries {comp['temp'] / size:.2f}, peak "
                     f"{comp['peak'] / size:.2f}")
        args = est["params"] + est["opt_state"] + est["batch"] + est["teacher"]
        lines.append(f"  analytic params+opt_state+batch{'+teacher' if est['teacher'] else ''} {args / size:.2f}"
                     f" vs compiled arguments {comp['argument'] / size:.2f}; analytic peak / compiled peak "
                     f"{est['peak'] / max(comp['peak'], 1):.2f}")
        if host and comp["platform"] == "cpu":
            lines.append("  (XLA:CPU counts pinned host memory as device memory: the compiled peak includes the "
                         "offloaded optimizer state)")
    worst = _worst(config, est, comp)
    verdict = "fits" if worst <= budget else "does NOT fit"
    lines.append(f"{verdict}: {worst / 1e9:.1f} GB (max of the estimates) vs {p.hbm_gb:g} GB per device minus "
                 f"{p.reserve_gb:g} GB reserve")
    return "\n".join(lines)


def run(config) -> dict:
    cfg = architecture(config)
    est = analytic(cfg, config)
    comp = compiled(config) if _section(config).compile else None
    text = report(cfg, config, est, comp)
    print(text, flush=True)
    with open(os.path.join(config.output_dir, "plan.txt"), "w") as f:
        f.write(text + "\n")
    p = _section(config)
    worst = _worst(config, est, comp)
    return {"analytic": est, "compiled": comp, "fits": worst <= (p.hbm_gb - p.reserve_gb) * 1e9,
            "num_params": cfg.num_params(), "report": text}
