"""The continued-pretraining loop: any Objective, sharded over a (data, fsdp, tensor) mesh, checkpointed, resumable.

    train(config, model, objective, data) -> summary

Reads config.train, config.optim, config.checkpoint, config.mesh (optional: 1 device) and config.seed. Each step
feeds this process's rows [B, T] to a jitted update (params and optimizer state donated, shardings from the
logical-axis rules); every checkpoint.every_steps steps a checkpoint is saved asynchronously; a run whose
checkpoint directory holds checkpoints continues from the newest one, exactly (same parameters bit for bit as an
uninterrupted run on CPU). A loss or gradient norm that is not finite stops the run with a one-line
TrainingDiverged; checkpoints from before are kept and none is written after.

The host reads step s's metrics while the device runs step s+1, so checks cost no idle device time; a checkpoint,
log line or evaluation at step s waits for s itself.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
import statistics
import time
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import flatten, logical_axes
from dmc_jax.training import offload, sharding
from dmc_jax.training.checkpoint import Checkpointer
from dmc_jax.training.metrics_log import MetricsWriter
from dmc_jax.training.objective import CE, WEIGHT, Objective
from dmc_jax.training.optimizer import make_optimizer
from dmc_jax.training.step import make_eval_step, make_train_step

DATA_FINGERPRINT = ("source", "seq_len", "batch_size", "seed", "shuffle", "shuffle_window", "reset_attention",
                    "add_bos", "add_eos", "train_split", "num_epochs")


class TrainingDiverged(UserError):
    """The loss or gradient norm stopped being finite; one line naming the step, the metric and the last checkpoint."""


@dataclasses.dataclass
class TrainData:
    """train: a checkpointable grain iterator of this process's batches ({'tokens', 'segment_ids', 'positions'},
    int32 numpy [B, T]); eval: returns a fresh pass over the validation split (or None: no evaluation)."""

    train: Any
    eval: Optional[Callable[[], Iterable[dict]]] = None


@dataclasses.dataclass
class Setup:
    """The compiled pieces of a run: mesh, shardings, optimizer, jitted train and eval steps."""

    mesh: jax.sharding.Mesh
    rules: tuple
    param_shardings: Any
    opt_shardings: Any
    batch_sharding: NamedSharding
    replicated: NamedSharding
    tx: Any
    schedule: Any
    train_step: Callable  # (params, opt_state, batch, rng, step[, frozen]) -> (params, opt_state, metrics); 0,1 donated
    eval_step: Callable  # (params, batch, step[, frozen]) -> weighted sums {'loss', CE, WEIGHT}
    frozen_shardings: Any = None  # of the objective's non-trained inputs (a distillation teacher), if any

    def put_frozen(self, frozen) -> tuple:
        """() or (frozen on the mesh,): the trailing arguments of train_step / eval_step."""
        return () if frozen is None else (jax.device_put(frozen, self.frozen_shardings),)

    def init_state(self, params, seed: int) -> tuple:
        """(params, optimizer state, base RNG key) placed on the mesh."""
        params = jax.device_put(params, self.param_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
        return params, opt_state, jax.device_put(jax.random.PRNGKey(seed), self.replicated)

    def abstract_state(self, params) -> dict:
        """ShapeDtypeStructs (with shardings) of the checkpointed state {'params', 'opt_state', 'rng'}."""
        sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
        abstract_params = jax.tree.map(sds, params, self.param_shardings)
        opt = jax.eval_shape(self.tx.init, abstract_params)
        return {"params": abstract_params, "opt_state": jax.tree.map(sds, opt, self.opt_shardings),
                "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=self.replicated)}

    def put_batch(self, batch: dict) -> dict:
        return sharding.put_batch(batch, self.batch_sharding)


def mesh_options(config) -> tuple[dict, tuple]:
    """({'data', 'fsdp', 'tensor'} sizes, rules) of config.mesh, defaults when the section is absent."""
    mesh = config.get("mesh")
    if mesh is None:
        return {"data": 1, "fsdp": 1, "tensor": 1}, sharding.DEFAULT_RULES
    rules = tuple((r[0], tuple(r[1]) if isinstance(r[1], (list, tuple)) else r[1]) for r in mesh.rules)
    dcn = {f"dcn_{a}": mesh.get(f"dcn_{a}", 1) for a in sharding.AXES}  # nodes per axis (hybrid mesh)
    return {**{a: mesh[a] for a in sharding.AXES}, **dcn}, rules


def setup(config, cfg: ModelConfig, params, objective: Objective, devices=None, frozen=None) -> Setup:
    """Mesh, shardings and the jitted steps for params (arrays or ShapeDtypeStructs) of cfg; frozen: the
    objective's non-trained inputs (objective.frozen_inputs), sharded like the weights of its teacher_cfg."""
    sizes, rules = mesh_options(config)
    mesh = sharding.make_mesh(sizes, devices)
    p_sh = sharding.param_shardings(logical_axes(cfg), params, mesh, rules)
    tx, schedule = make_optimizer(config.optim, config.train.steps)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, p_sh)
    o_sh = sharding.state_shardings(jax.eval_shape(tx.init, abstract), params, p_sh, mesh)
    b_sh = sharding.batch_sharding(mesh, rules)
    rep = NamedSharding(mesh, P())
    hints = sharding.activation_hints(mesh, rules)  # activations named in the model, mapped by the same rules
    step_fn = make_train_step(objective, tx, schedule, config.train.grad_accum)
    if config.train.get("offload_opt_state", False):  # optimizer state in pinned host memory between steps
        step_fn, o_sh = offload.offloaded(step_fn, o_sh), offload.host_shardings(o_sh)
    f_sh = None if frozen is None else sharding.param_shardings(
        logical_axes(getattr(objective, "teacher_cfg", None) or cfg), frozen, mesh, rules)
    extra = () if frozen is None else (f_sh,)  # the steps take `frozen` as a last argument only when there is one
    train_step = jax.jit(hints(step_fn),
                         in_shardings=(p_sh, o_sh, b_sh, rep, rep, *extra), out_shardings=(p_sh, o_sh, rep),
                         donate_argnums=(0, 1))
    eval_step = jax.jit(hints(make_eval_step(objective)), in_shardings=(p_sh, b_sh, rep, *extra), out_shardings=rep)
    return Setup(mesh, rules, p_sh, o_sh, b_sh, rep, tx, schedule, train_step, eval_step, f_sh)


def fingerprint(params, opt_abstract, config) -> dict:
    """What a checkpoint must share with the run resuming it: parameter shapes, optimizer-state layout, data options."""
    fp = {f"param {k}": f"{tuple(v.shape)} {np.dtype(v.dtype).name}" for k, v in flatten(params).items()}
    fp["optimizer state"] = hashlib.blake2b(str(jax.tree.structure(opt_abstract)).encode(), digest_size=6).hexdigest()
    fp["processes"] = jax.process_count()
    data = config.get("data")
    for name in DATA_FINGERPRINT:
        if data is not None and name in data:
            fp[f"data.{name}"] = data[name]
    return fp


class _NoWriter:
    """The MetricsWriter of processes other than 0."""

    path = None

    def write(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


def _check_batch(batch: dict, grad_accum: int, divisor: int) -> None:
    rows = batch["tokens"].shape[0] * jax.process_count()  # global rows: each process feeds its share
    if rows % grad_accum or (rows // grad_accum) % divisor:
        raise UserError(f"{rows} rows per batch cannot be split into train.grad_accum={grad_accum} micro-batches "
                        f"divisible by the {divisor} batch shards of the mesh; change data.batch_size, "
                        f"train.grad_accum or mesh.data / mesh.fsdp")


def _run_dir(config) -> str:
    path = config.get("output_dir") or os.path.join(
        "runs", f"train-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(path, exist_ok=True)
    return path


def _mean_window(window: list[dict]) -> dict:
    """Host metrics of several steps -> their mean (WEIGHT summed)."""
    out = {}
    for name in window[0]:
        values = np.stack([np.asarray(m[name], np.float64) for m in window])
        out[name] = values.sum(0) if name == WEIGHT else values.mean(0)
    return out


def evaluate(s: Setup, params, eval_batches: Iterable[dict], max_batches: int, step: int, frozen=()) -> dict:
    """{'eval/loss', 'eval/perplexity', 'eval/weight'} over the validation batches (max_batches, 0 = all)."""
    sums = None
    for i, batch in enumerate(eval_batches):
        if max_batches and i >= max_batches:
            break
        out = s.eval_step(params, s.put_batch(batch), jnp.int32(step), *frozen)
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    if sums is None:
        raise UserError("the validation split yielded no batch; set data.eval_split or train.eval_every=0")
    host = jax.device_get(sums)
    w = max(float(host[WEIGHT]), 1e-30)
    ce = float(host[CE]) / w
    return {"eval/loss": float(host["loss"]) / w, "eval/perplexity": math.exp(min(ce, 700.0)),
            "eval/weight": float(host[WEIGHT])}


def train(config, model, objective: Objective, data: TrainData) -> dict:
    """Trains model.params (stacked layout; consumed: its buffers are donated) on data with objective; returns a
    summary for results.json. The final parameters are in the last checkpoint."""
    t, c = config.train, config.checkpoint
    cfg, params = model.cfg, model.params
    if isinstance(params["layers"], tuple):
        raise ValueError("training needs the stacked parameter layout: load_model(config, layout='training')")
    run_dir = _run_dir(config)
    frozen_inputs = getattr(objective, "frozen_inputs", None)  # e.g. a teacher: the initial weights, copied
    frozen = frozen_inputs(params) if frozen_inputs is not None else None
    s = setup(config, cfg, params, objective, frozen=frozen)
    frozen = s.put_frozen(frozen)  # () without one
    abstract = s.abstract_state(params)
    fp = fingerprint(params, abstract["opt_state"], config)
    ckpt_dir = c.dir or os.path.join(run_dir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, c.max_to_keep, c.async_save)
    latest = ckpt.latest_step()
    iterator = data.train
    try:
        if latest is not None and not c.resume:
            raise UserError(f"{ckpt.directory} already holds checkpoints (newest: step {latest}) and "
                            f"checkpoint.resume is False; set output_dir (or checkpoint.dir) to a new directory")
        if latest is not None:
            state, iterator = ckpt.restore(latest, abstract, iterator, fp)
            params, opt_state, rng = state["params"], state["opt_state"], state["rng"]
        else:
            params, opt_state, rng = s.init_state(params, config.get("seed", 0))
    except BaseException:
        ckpt.close()
        raise
    start = latest or 0
    main_process = jax.process_index() == 0  # the others train too but write no logs
    writer = MetricsWriter(run_dir, t.tensorboard, resume_step=latest) if main_process else _NoWriter()
    bar = tqdm(total=t.steps, initial=start, disable=not (t.progress and main_process), unit="step",
               dynamic_ncols=True)
    divisor = sharding.batch_divisor(s.mesh, s.rules)
    print(f"training steps {start + 1}..{t.steps} on mesh {dict(s.mesh.shape)}; checkpoints in {ckpt.directory}"
          + (f" (resumed from step {latest})" if latest is not None else ""), flush=True)

    last_saved = latest
    window: list[dict] = []
    window_tokens, window_time = 0, 0.0
    step_times: list[float] = []
    clock = [time.perf_counter()]
    last_eval = final_loss = None

    def finish(pending) -> None:
        """Waits for one step's metrics, checks them, adds them to the logging window."""
        nonlocal window_tokens, window_time
        done, metrics, tokens = pending
        host = jax.device_get(metrics)
        now = time.perf_counter()
        step_times.append(now - clock[0])
        window_time += now - clock[0]
        clock[0] = now
        for name in ("loss", "grad_norm"):
            value = float(host[name])
            if not math.isfinite(value):
                ckpt.wait()
                where = (f"the last good checkpoint is step {last_saved} in {ckpt.directory}" if last_saved is not None
                         else "no checkpoint was written")
                raise TrainingDiverged(f"training diverged at step {done}: {name} is {value} (loss "
                                       f"{float(host['loss'])}, grad_norm {float(host['grad_norm'])}, lr "
                                       f"{float(host['lr']):.3g}); {where}; lower optim.lr or raise "
                                       f"optim.warmup_steps and resume")
        window.append(host)
        window_tokens += tokens
        bar.update(1)

    on_step = getattr(objective, "on_step", None)
    pending = None
    try:
        for step in range(start, t.steps):
            try:
                batch = next(iterator)
            except StopIteration:
                raise UserError(f"the training data ran out after {step} steps; set data.num_epochs=0 (repeat) or "
                                f"lower train.steps") from None
            if step == start:
                _check_batch(batch, t.grad_accum, divisor)
            tokens = int((np.asarray(batch["segment_ids"]) > 0).sum()) * jax.process_count()
            if on_step is not None:
                changed = on_step(params, step)
                if changed is not params:
                    params = jax.device_put(changed, s.param_shardings)
            params, opt_state, metrics = s.train_step(params, opt_state, s.put_batch(batch), rng, jnp.int32(step),
                                                      *frozen)
            if pending is not None:
                finish(pending)
            pending = (step + 1, metrics, tokens)
            done = step + 1
            last = done == t.steps
            log = last or done % t.log_every == 0
            save = last or (c.every_steps and done % c.every_steps == 0)
            run_eval = data.eval is not None and t.eval_every and (last or done % t.eval_every == 0)
            if not (log or save or run_eval):
                continue
            finish(pending)
            pending = None
            if log:
                row = _mean_window(window)
                row.update(tokens_per_second=window_tokens / window_time, step_time_s=window_time / len(window))
                writer.write(done, row)
                final_loss = float(row["loss"])
                bar.set_postfix(loss=f"{final_loss:.4f}")
                window, window_tokens, window_time = [], 0, 0.0
            if save:
                ckpt.save(done, {"params": params, "opt_state": opt_state, "rng": rng}, iterator, fp)
                last_saved = done
            if run_eval:
                last_eval = evaluate(s, params, data.eval(), t.eval_batches, done, frozen)
                writer.write(done, last_eval)
                bar.write(f"step {done}: eval loss {last_eval['eval/loss']:.4f}, "
                          f"perplexity {last_eval['eval/perplexity']:.3f}")
            clock[0] = time.perf_counter()  # logging, saving and evaluating are not step time
        if pending is not None:
            finish(pending)
    finally:
        bar.close()
        writer.close()
        ckpt.close()
    timed = step_times[1:] or step_times  # the first includes compilation
    return {"run_dir": run_dir, "checkpoint_dir": ckpt.directory, "start_step": start, "steps": t.steps,
            "resumed_from": latest, "last_checkpoint": last_saved, "final_loss": final_loss, "final_eval": last_eval,
            "step_time_median_s": statistics.median(timed) if timed else None, "mesh": dict(s.mesh.shape),
            "metrics_file": writer.path}
