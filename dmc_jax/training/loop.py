"""The continued-pretraining loop: any Objective, sharded over a (data, fsdp, tensor) mesh, checkpointed, resumable.

    train(config, model, objective, data) -> summary

Reads config.train, config.optim, config.checkpoint, config.mesh (optional: 1 device) and config.seed. Each step
feeds this process's rows [B, T] to a jitted update (params and optimizer state donated, shardings from the
logical-axis rules); every checkpoint.every_steps steps a checkpoint is saved asynchronously; a run whose
checkpoint directory holds checkpoints continues from the newest intact one, exactly (same parameters bit for bit as an
uninterrupted run on CPU). A loss or gradient norm that is not finite stops the run with a one-line
TrainingDiverged; checkpoints from before are kept and none is written after.

The host reads step s's metrics while the device runs step s+1, so checks cost no idle device time; a checkpoint,
log line or evaluation at step s waits for s itself.

A resumed run continues the bookkeeping too: the logging window is kept in each checkpoint, an evaluation due at the
resumed step that the dead run did not write is run first, and the final loss and evaluation of a run resumed after
it finished come from metrics.jsonl; so metrics.jsonl and results.json read as an uninterrupted run's. Ctrl-C stops
with one line naming the step and the checkpoint to resume from (errors.Interrupted).

train() is Trainer(config, model, objective, data).run(), in pieces with one job each: _resume (restore or
initialize), _open_log (metrics file, progress bar, summary so far), _catch_up (a missed evaluation), _train_steps
(the pipelined update loop), _step (dispatch one update), _finish (read and check its metrics), _after (log, save,
evaluate), _interrupted (Ctrl-C), _summary.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import math
import os
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dmc_jax.errors import Interrupted, UserError
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import flatten, logical_axes
from dmc_jax.training import distributed, offload, sharding
from dmc_jax.training.checkpoint import Checkpointer, fingerprint_diffs
from dmc_jax.training.metrics_log import MetricsWriter
from dmc_jax.training.objective import CE, WEIGHT, Objective
from dmc_jax.training.progress import Diverged, Window
from dmc_jax.training.optimizer import freeze_mask, make_optimizer
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
    freeze = tuple(config.optim.get("freeze", ()))
    step_fn = make_train_step(objective, tx, schedule, config.train.grad_accum,
                              freeze_mask(freeze) if freeze else None)
    if config.train.get("offload_opt_state", False):  # optimizer state in pinned host memory between steps
        step_fn, o_sh = offload.offloaded(step_fn, o_sh), offload.host_shardings(o_sh)
    f_sh = None if frozen is None else sharding.param_shardings(
        logical_axes(getattr(objective, "teacher_cfg", None) or cfg), frozen, mesh, rules)
    extra = () if frozen is None else (f_sh,)  # the steps take `frozen` as a last argument only when there is one
    train_step = distributed.LinedUp(jax.jit(hints(step_fn), in_shardings=(p_sh, o_sh, b_sh, rep, rep, *extra),
                                             out_shardings=(p_sh, o_sh, rep), donate_argnums=(0, 1)), "train-step")
    eval_step = distributed.LinedUp(jax.jit(hints(make_eval_step(objective)), in_shardings=(p_sh, b_sh, rep, *extra),
                                            out_shardings=rep), "eval-step")
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
    if data is not None and data.get("recall_fraction", 0) > 0:  # only when on: older checkpoints stay resumable
        fp["data.recall_fraction"], fp["data.recall_facts"] = data.recall_fraction, data.recall_facts
        if data.get("recall_span", 0.5) != 0.5:
            fp["data.recall_span"] = data.recall_span
    return fp


def warm_start(source: str, abstract_state, fp: dict) -> tuple[Any, int]:
    """checkpoint.init_from: (state, step) of another run's checkpoint, `<dir>` (its newest intact step) or
    `<dir>/<step>`. Parameters, optimizer state, RNG and step continue from it; the data iterator starts afresh
    with this run's data options (the point: continue a run on another data mix). The model and optimizer must
    match (compared with the fingerprint stored there); its directory is only read."""
    directory, step = source.rstrip("/"), None
    if os.path.basename(directory).isdigit():
        directory, step = os.path.dirname(directory), int(os.path.basename(directory))
    if not os.path.isdir(directory):
        raise UserError(f"checkpoint.init_from={source!r}: no such directory; give a run's checkpoint directory "
                        f"(<output_dir>/checkpoints) or one step of it (<dir>/<step>)")
    with Checkpointer(directory, read_only=True) as other:
        steps = other.all_steps()
        step = (steps[-1] if steps else None) if step is None else step
        if step is None or step not in steps:
            raise UserError(f"checkpoint.init_from={source!r}: {directory} holds no checkpoint step "
                            f"{'' if step is None else step} (steps there: {steps or 'none'}); give a run's "
                            f"checkpoint directory or <dir>/<step>")
        stored = other.stored_fingerprint(step)
        diffs = fingerprint_diffs(stored, fp, ignore_prefix="data.")
        if diffs:
            raise UserError(f"checkpoint.init_from={source!r}: step {step} was written for another model or "
                            f"optimizer ({'; '.join(diffs[:3])}{' ...' if len(diffs) > 3 else ''}); start from a "
                            f"checkpoint of the same model, method and optimizer")
        state = other.restore_state(step, abstract_state)
    print(f"initialized from {directory}/{step} (parameters, optimizer state, step); data: this run's options",
          flush=True)
    return state, step


class _NoWriter:
    """The MetricsWriter of processes other than 0."""

    path = None
    kept: list = []

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
    return Trainer(config, model, objective, data).run()


class Trainer:
    """One training run: its compiled setup, checkpointer, state, data, metrics file and progress bar."""

    def __init__(self, config, model, objective: Objective, data: TrainData):
        if isinstance(model.params["layers"], tuple):
            raise ValueError("training needs the stacked parameter layout: load_model(config, layout='training')")
        self.t, self.c, self.data, self.objective = config.train, config.checkpoint, data, objective
        self.run_dir = _run_dir(config)
        frozen_inputs = getattr(objective, "frozen_inputs", None)  # e.g. a teacher: the initial weights, copied
        frozen = frozen_inputs(model.params) if frozen_inputs is not None else None
        self.s = setup(config, model.cfg, model.params, objective, frozen=frozen)
        self.frozen = self.s.put_frozen(frozen)  # () without one
        self.ckpt = Checkpointer(self.c.dir or os.path.join(self.run_dir, "checkpoints"), self.c.max_to_keep,
                                 self.c.async_save)
        try:
            self.start = self._resume(config, model.params)
        except BaseException:
            self.ckpt.close()
            raise
        self.last_saved = self.resumed_from
        self.final_loss = self.last_eval = None

    def _resume(self, config, params) -> int:
        """Restores the newest intact checkpoint (or initializes); returns the first step to run."""
        abstract = self.s.abstract_state(params)
        self.fp = fingerprint(params, abstract["opt_state"], config)
        self.iterator, log = self.data.train, None
        latest = self.ckpt.latest_step()
        if latest is not None and not self.c.resume:
            raise UserError(f"{self.ckpt.directory} already holds checkpoints (newest: step {latest}) and "
                            f"checkpoint.resume is False; set output_dir (or checkpoint.dir) to a new directory")
        restored = self.ckpt.restore_latest(abstract, self.iterator, self.fp)
        start = 0
        if restored is not None:
            self.iterator, log = restored.iterator, restored.log
            self.params, self.opt_state, self.rng = (restored.state[k] for k in ("params", "opt_state", "rng"))
            start = restored.step
        elif self.c.get("init_from", ""):
            state, start = warm_start(self.c.init_from, abstract, self.fp)
            self.params, self.opt_state, self.rng = (state[k] for k in ("params", "opt_state", "rng"))
        else:
            self.params, self.opt_state, self.rng = self.s.init_state(params, config.get("seed", 0))
        self.resumed_from = None if restored is None else restored.step
        self.window = Window.from_state(log)
        return start

    def _open_log(self) -> None:
        """metrics.jsonl (truncated to the resumed step) and the progress bar; the summary so far from the rows."""
        main_process = jax.process_index() == 0  # the others train too but write no logs
        self.writer = (MetricsWriter(self.run_dir, self.t.tensorboard, resume_step=self.start) if main_process
                       else _NoWriter())
        for row in self.writer.kept:
            if "loss" in row:
                self.final_loss = float(row["loss"])
            if "eval/loss" in row:
                self.last_eval = {k: v for k, v in row.items() if k.startswith("eval/")}
        self.bar = tqdm(total=self.t.steps, initial=self.start, disable=not (self.t.progress and main_process),
                        unit="step", dynamic_ncols=True)

    def _due(self, done: int) -> tuple[bool, bool, bool]:
        """(log, save, evaluate) after step `done`."""
        t, last = self.t, done == self.t.steps
        return (last or done % t.log_every == 0, last or bool(self.c.every_steps and done % self.c.every_steps == 0),
                bool(self.data.eval is not None and t.eval_every and (last or done % t.eval_every == 0)))

    def _step(self, step: int, on_step) -> tuple:
        """Starts update `step` on the device; returns (step + 1, its metrics on the device, its tokens)."""
        try:
            batch = next(self.iterator)
        except StopIteration:
            raise UserError(f"the training data ran out after {step} steps; set data.num_epochs=0 (repeat) or "
                            f"lower train.steps") from None
        if step == self.start:
            _check_batch(batch, self.t.grad_accum, sharding.batch_divisor(self.s.mesh, self.s.rules))
        tokens = int((np.asarray(batch["segment_ids"]) > 0).sum()) * jax.process_count()
        if on_step is not None:
            changed = on_step(self.params, step)
            if changed is not self.params:
                self.params = jax.device_put(changed, self.s.param_shardings)
        self.params, self.opt_state, metrics = self.s.train_step(self.params, self.opt_state,
                                                                 self.s.put_batch(batch), self.rng, jnp.int32(step),
                                                                 *self.frozen)
        return step + 1, metrics, tokens

    def _finish(self, pending: tuple) -> None:
        """Waits for one step's metrics and adds them to the window; a value that is not finite stops the run."""
        done, metrics, tokens = pending
        host = jax.device_get(metrics)
        try:
            self.window.add(done, host, tokens)
        except Diverged as d:
            self.ckpt.wait()
            where = (f"the last good checkpoint is step {self.last_saved} in {self.ckpt.directory}"
                     if self.last_saved is not None else "no checkpoint was written")
            raise TrainingDiverged(f"training diverged at step {done}: {d.name} is {float(host[d.name])} (loss "
                                   f"{float(host['loss'])}, grad_norm {float(host['grad_norm'])}, lr "
                                   f"{float(host['lr']):.3g}); {where}; lower optim.lr or raise "
                                   f"optim.warmup_steps and resume") from None
        self.bar.update(1)

    def _log(self, done: int) -> None:
        row = self.window.row()
        self.writer.write(done, row)
        self.final_loss = float(row["loss"])
        self.bar.set_postfix(loss=f"{self.final_loss:.4f}")

    def _save(self, done: int) -> None:
        self.ckpt.save(done, {"params": self.params, "opt_state": self.opt_state, "rng": self.rng}, self.iterator,
                       self.fp, log=self.window.state())
        self.last_saved = done

    def _evaluate(self, done: int) -> None:
        self.last_eval = evaluate(self.s, self.params, self.data.eval(), self.t.eval_batches, done, self.frozen)
        self.writer.write(done, self.last_eval)
        self.bar.write(f"step {done}: eval loss {self.last_eval['eval/loss']:.4f}, "
                       f"perplexity {self.last_eval['eval/perplexity']:.3f}")

    def _catch_up(self) -> None:
        """The evaluation due at the resumed step, if the run that saved it died before writing it (process 0
        decides from metrics.jsonl; every process evaluates)."""
        need = bool(self.resumed_from and self._due(self.resumed_from)[2] and not any(
            r.get("step") == self.resumed_from and "eval/loss" in r for r in self.writer.kept))
        mine = str(int(need)) if jax.process_index() == 0 else None
        need = distributed.share_from_main("catch-up-eval", mine) == "1"
        if need:
            self._evaluate(self.resumed_from)

    def _after(self, done: int, log: bool, save: bool, run_eval: bool) -> None:
        """What is due after step `done`, in this order: its log row, its checkpoint, its evaluation."""
        if log:
            self._log(done)
        if save:
            self._save(done)
        if run_eval:
            self._evaluate(done)
        self.window.pause()  # logging, saving and evaluating are not step time

    def _train_steps(self) -> None:
        """Steps start+1..train.steps; step s+1 is dispatched before step s's metrics are read, unless something
        is due after s."""
        on_step = getattr(self.objective, "on_step", None)
        pending = None
        for step in range(self.start, self.t.steps):
            self.current = step + 1
            started = self._step(step, on_step)
            if pending is not None:
                self._finish(pending)
            pending = started
            due = self._due(started[0])
            if any(due):
                self._finish(pending)
                pending = None
                self._after(started[0], *due)
        if pending is not None:
            self._finish(pending)

    def _interrupted(self) -> Interrupted:
        self.ckpt.wait()
        where = (f"the last checkpoint is step {self.last_saved} in {self.ckpt.directory}; run the same command "
                 f"again to resume from it" if self.last_saved is not None else
                 "no checkpoint was written yet; run the same command again to start over")
        return Interrupted(f"interrupted during training step {self.current} of {self.t.steps}; {where}")

    def run(self) -> dict:
        """Trains to train.steps; returns the summary. Closes the checkpointer (waits for the last save)."""
        self._open_log()
        print(f"training steps {self.start + 1}..{self.t.steps} on mesh {dict(self.s.mesh.shape)}; checkpoints in "
              f"{self.ckpt.directory}" + (f" (resumed from step {self.start})" if self.resumed_from else ""),
              flush=True)
        self.current = self.start + 1
        try:
            distributed.barrier("first-step")
            self._catch_up()
            self._train_steps()
        except KeyboardInterrupt:
            raise self._interrupted() from None
        finally:
            self.bar.close()
            self.writer.close()
            self.ckpt.close()
        return self._summary()

    def _summary(self) -> dict:
        return {"run_dir": self.run_dir, "checkpoint_dir": self.ckpt.directory, "start_step": self.start,
                "steps": self.t.steps, "resumed_from": self.resumed_from, "last_checkpoint": self.last_saved,
                "final_loss": self.final_loss, "final_eval": self.last_eval,
                "step_time_median_s": self.window.median_step_time(), "mesh": dict(self.s.mesh.shape),
                "metrics_file": self.writer.path}
