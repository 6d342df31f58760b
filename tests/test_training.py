"""The training loop on the tiny model: learning, accumulation == big batch, checkpoints, exact resume after
SIGKILL, the NaN guard, sharded == single device, schedules and config errors."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dmc_jax.config_loader import load_config_file
from dmc_jax.data import pipeline
from dmc_jax.data.prepare import prepare
from dmc_jax.errors import UserError
from dmc_jax.main import main
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params
from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer
from dmc_jax.training import loop
from dmc_jax.training.checkpoint import Checkpointer
from dmc_jax.training.objective import LanguageModelObjective, make_objective
from dmc_jax.training.optimizer import decay_mask, make_schedule
from dmc_jax.training.step import accumulate_gradients
from dmc_jax.weights import LoadedModel
from tests.test_data_helpers import data_config, write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(ROOT, "configs", "smollm2_train.py")
CFG = tiny_config(vocab_size=ByteTokenizer.vocab_size)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A prepared byte-level corpus (seq_len 32, batch 4) and its tmp directory."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = data_config(tmp, write_corpus(tmp / "corpus", num_files=3, paragraphs_per_file=30))
    prepare(cfg, ByteTokenizer())
    return tmp, cfg


def make_config(data, out: pathlib.Path, **overrides) -> ml_collections.ConfigDict:
    """configs/smollm2_train.py for the tiny model on the test corpus; overrides as {'train.steps': 4}."""
    c = load_config_file(TRAIN_CONFIG)
    c.model.source = "tiny"
    c.data = data.copy_and_resolve_references()
    c.output_dir = str(out)
    c.train.update(steps=6, log_every=2, eval_every=0, progress=False, tensorboard=False)
    c.optim.update(lr=3e-3, warmup_steps=2, schedule="constant")
    c.checkpoint.update(every_steps=2, async_save=True)
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def tiny_model(seed: int = 0) -> LoadedModel:
    return LoadedModel(CFG, init_params(CFG, jax.random.PRNGKey(seed)), ByteTokenizer(), "tiny")


def packed_batch(rows: int = 8, seq_len: int = 32, seed: int = 0) -> dict:
    """Random tokens with uneven segments per row and some padding (so rows hold different target counts)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, CFG.vocab_size, (rows, seq_len), dtype=np.int32)
    segments = np.zeros((rows, seq_len), np.int32)
    positions = np.zeros((rows, seq_len), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(1, seq_len), size=r % 4, replace=False))
        end = seq_len - (r % 3) * 5  # padding at the end of some rows
        for s, (a, b) in enumerate(zip(np.r_[0, cuts], np.r_[cuts, seq_len])):
            b = min(b, end)
            segments[r, a:b] = s + 1
            positions[r, a:b] = np.arange(max(b - a, 0))
    tokens[segments == 0] = 0
    return {"tokens": tokens, "segment_ids": segments, "positions": positions}


def test_loss_decreases_on_a_repeated_batch(corpus):
    config = make_config(corpus[1], corpus[0] / "unused")
    model = tiny_model()
    s = loop.setup(config, CFG, model.params, LanguageModelObjective(CFG))
    params, opt_state, rng = s.init_state(model.params, 0)
    batch = s.put_batch(packed_batch(rows=4))
    losses = []
    for step in range(25):
        params, opt_state, metrics = s.train_step(params, opt_state, batch, rng, jnp.int32(step))
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.6 * losses[0], losses


def test_gradient_accumulation_equals_one_big_batch():
    params = init_params(CFG, jax.random.PRNGKey(1))
    batch = jax.tree.map(jnp.asarray, packed_batch(rows=8, seed=3))  # rows hold different target counts
    objective = LanguageModelObjective(CFG)
    run = jax.jit(accumulate_gradients, static_argnums=(0, 5))
    loss_1, metrics_1, grads_1 = run(objective, params, batch, None, jnp.int32(0), 1)
    for k in (2, 4):
        loss_k, metrics_k, grads_k = run(objective, params, batch, None, jnp.int32(0), k)
        assert float(metrics_1["weight"]) == float(metrics_k["weight"]) > 0
        np.testing.assert_allclose(loss_k, loss_1, rtol=1e-6)
        np.testing.assert_allclose(metrics_k["accuracy"], metrics_1["accuracy"], rtol=1e-6)
        for g1, gk in zip(jax.tree.leaves(grads_1), jax.tree.leaves(grads_k)):
            assert gk.dtype == jnp.float32
            np.testing.assert_allclose(gk, g1, rtol=2e-5, atol=1e-7)


def test_bf16_compute_keeps_fp32_master_weights():
    cfg = CFG.replace(compute_dtype="bfloat16")
    config = make_config(ml_collections.ConfigDict({"seq_len": 32}), pathlib.Path("unused"))
    params = init_params(cfg, jax.random.PRNGKey(0))
    s = loop.setup(config, cfg, params, LanguageModelObjective(cfg))
    p, o, rng = s.init_state(params, 0)
    p, o, metrics = s.train_step(p, o, s.put_batch(packed_batch(rows=4)), rng, jnp.int32(0))
    assert {x.dtype for x in jax.tree.leaves((p, o)) if x.ndim} == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


def test_frozen_groups_keep_their_weights_get_no_optimizer_state_and_no_weight_gradient_matmuls():
    """optim.freeze=('embed', 'mlp'): those weights stay bit-identical over updates, the rest moves; Adam keeps no
    moments for them; and the step costs fewer FLOPs (their weight gradients are never computed)."""
    config = make_config(ml_collections.ConfigDict({"seq_len": 32}), pathlib.Path("unused"))
    params = jax.device_get(init_params(CFG, jax.random.PRNGKey(0)))  # host copies: the step donates its own
    batch = packed_batch(rows=4)
    flops = {}
    for freeze in ((), ("embed", "mlp")):
        config.optim.freeze = freeze
        s = loop.setup(config, CFG, params, LanguageModelObjective(CFG))
        p, o, rng = s.init_state(params, 0)
        put = s.put_batch(batch)
        flops[freeze] = s.train_step.lower(p, o, put, rng, jnp.int32(0)).cost_analysis()["flops"]
        moments = sum(x.size for x in jax.tree.leaves(o) if x.ndim)
        for step in range(3):
            p, o, metrics = s.train_step(p, o, put, rng, jnp.int32(step))
        assert np.isfinite(float(metrics["loss"]))
        before, after = params, jax.device_get(p)
        for name in ("gate", "up", "down", "q", "o"):
            same = np.array_equal(before["layers"][name], after["layers"][name])
            assert same == (freeze != () and name in ("gate", "up", "down")), (freeze, name)
        assert np.array_equal(before["embed"]["embedding"], after["embed"]["embedding"]) == bool(freeze)
        mlp_and_embed = sum(params["layers"][n].size for n in ("gate", "up", "down")) + \
            params["embed"]["embedding"].size + params["lm_head"].size
        total = sum(x.size for x in jax.tree.leaves(params))
        assert moments == 2 * (total - (mlp_and_embed if freeze else 0))  # Adam's mu and nu, trained weights only
    assert flops[("embed", "mlp")] < 0.85 * flops[()], flops


def test_schedule_warmup_hold_cosine_and_decay_mask():
    optim = ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=4, schedule="cosine", hold_steps=3, decay_steps=0,
                                           end_lr=0.1))
    lr = [float(make_schedule(optim, total_steps=17)(i)) for i in range(20)]
    np.testing.assert_allclose(lr[:4], [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(lr[4:8], 1.0)  # hold
    assert all(a > b for a, b in zip(lr[7:17], lr[8:17]))  # cosine decay
    np.testing.assert_allclose(lr[17:], 0.1, rtol=1e-6)
    optim.update(schedule="linear", hold_steps=0)
    np.testing.assert_allclose(float(make_schedule(optim, 14)(9)), 1.0 - 0.9 * 5 / 10, rtol=1e-6)
    params = init_params(CFG, jax.random.PRNGKey(0))
    for decay_embeddings in (True, False):
        mask = decay_mask(decay_embeddings)(params)
        assert not mask["final_norm"] and not mask["layers"]["attn_norm"] and not mask["layers"]["mlp_norm"]
        assert mask["layers"]["q"] and mask["layers"]["down"]
        assert mask["embed"]["embedding"] == mask["lm_head"] == decay_embeddings


def test_checkpoint_round_trip_with_the_data_iterator(corpus):
    tmp, data = corpus
    config = make_config(data, tmp / "unused")
    model = tiny_model()
    s = loop.setup(config, CFG, model.params, LanguageModelObjective(CFG))
    abstract = s.abstract_state(model.params)
    params, opt_state, rng = s.init_state(model.params, 0)
    iterator = pipeline.make_iterator(data, ByteTokenizer())
    params, opt_state, _ = s.train_step(params, opt_state, s.put_batch(next(iterator)), rng, jnp.int32(0))
    state = jax.device_get({"params": params, "opt_state": opt_state, "rng": rng})
    fp = loop.fingerprint(params, abstract["opt_state"], config)
    with Checkpointer(str(tmp / "ckpt_rt")) as ckpt:
        ckpt.save(1, {"params": params, "opt_state": opt_state, "rng": rng}, iterator, fp)
        expected = next(iterator)
    with Checkpointer(str(tmp / "ckpt_rt")) as ckpt:
        assert ckpt.latest_step() == 1
        restored, resumed = ckpt.restore(1, abstract, pipeline.make_iterator(data, ByteTokenizer()), fp)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored), state)
    jax.tree.map(np.testing.assert_array_equal, next(resumed), expected)

    other = dict(fp, **{"data.seq_len": 64})
    with Checkpointer(str(tmp / "ckpt_rt")) as ckpt, pytest.raises(UserError, match="different run configuration"):
        ckpt.restore(1, abstract, pipeline.make_iterator(data, ByteTokenizer()), other)


def test_corrupt_checkpoint_is_a_one_line_error_and_nothing_is_deleted(corpus):
    tmp, data = corpus
    out = tmp / "corrupt"
    config = make_config(data, out, **{"train.steps": 2})
    summary = loop.train(config, tiny_model(), LanguageModelObjective(CFG),
                         loop.TrainData(pipeline.make_iterator(data, ByteTokenizer())))
    assert summary["last_checkpoint"] == 2
    state_dir = out / "checkpoints" / "2" / "state"
    files = sorted(p for p in state_dir.rglob("*") if p.is_file())
    for p in files:
        if p.stat().st_size > 64:
            p.write_bytes(b"\0garbage" * 8)
    before = sorted((str(p), p.stat().st_size) for p in (out / "checkpoints").rglob("*") if p.is_file())
    config.train.steps = 4
    with pytest.raises(UserError) as err:
        loop.train(config, tiny_model(), LanguageModelObjective(CFG),
                   loop.TrainData(pipeline.make_iterator(data, ByteTokenizer())))
    message = str(err.value)
    assert "\n" not in message and str(out / "checkpoints") in message and "corrupt" in message, message
    after = sorted((str(p), p.stat().st_size) for p in (out / "checkpoints").rglob("*") if p.is_file())
    assert after == before


class InfAtStep:
    """The LM objective with an infinite loss at one update (a stand-in for a divergence), an array metric, and an
    on_step hook that zeroes lm_head before update 2."""

    def __init__(self, cfg, bad_step):
        self.inner, self.bad_step, self.hook_steps = LanguageModelObjective(cfg), bad_step, []

    def on_step(self, params, step):
        self.hook_steps.append(step)
        return {**params, "lm_head": jnp.zeros_like(params["lm_head"])} if step == 2 else params

    def loss(self, params, batch, rng, step):
        loss, metrics = self.inner.loss(params, batch, rng, step)
        per_head = params["layers"]["k"].mean(axis=(1, 3))  # [layers, kv_heads], like DMC's per-head rates
        return loss + jnp.where(step == self.bad_step, jnp.inf, 0.0), {**metrics, "per_head": per_head}


def test_nan_guard_stops_with_one_line_and_keeps_the_last_good_checkpoint(corpus):
    tmp, data = corpus
    out = tmp / "diverge"
    config = make_config(data, out, **{"train.steps": 10, "checkpoint.every_steps": 1, "checkpoint.max_to_keep": 0})
    objective = InfAtStep(CFG, bad_step=4)
    with pytest.raises(loop.TrainingDiverged) as err:
        loop.train(config, tiny_model(), objective, loop.TrainData(pipeline.make_iterator(data, ByteTokenizer())))
    assert objective.hook_steps == [0, 1, 2, 3, 4]
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, UserError)
    assert "diverged at step 5: loss is inf" in message and "last good checkpoint is step 4" in message, message
    with Checkpointer(str(out / "checkpoints")) as ckpt:
        assert ckpt.all_steps() == [1, 2, 3, 4]
    before, after = (np.abs(_final_state(out / "checkpoints", n)["params"]["lm_head"]).max() for n in (2, 3))
    assert before > 0.1 and after < 0.01  # zeroed by the hook, then one update of size ~lr
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [2, 4]
    assert np.asarray(lines[-1]["per_head"]).shape == (CFG.num_layers, CFG.num_kv_heads)  # arrays as lists


def test_a_huge_learning_rate_diverges(corpus):
    tmp, data = corpus
    config = make_config(data, tmp / "lr", **{"optim.lr": 1e30, "optim.warmup_steps": 0, "train.steps": 8,
                                              "checkpoint.every_steps": 1})
    with pytest.raises(loop.TrainingDiverged, match=r"diverged at step \d: (loss|grad_norm) is (nan|inf)"):
        loop.train(config, tiny_model(), make_objective("lm", config, CFG),
                   loop.TrainData(pipeline.make_iterator(data, ByteTokenizer())))


def _write_config(path: pathlib.Path, config: ml_collections.ConfigDict) -> str:
    path.write_text("import ml_collections\n\n\ndef get_config():\n    return ml_collections.ConfigDict("
                    f"{config.to_dict()!r})\n")
    return str(path)


def _run(config_path: str, *overrides: str, wait: bool = True):
    argv = [sys.executable, "-m", "dmc_jax.main", "--config", config_path, *overrides]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return out


def _final_state(ckpt_dir: pathlib.Path, step: int):
    with ocp.CheckpointManager(ckpt_dir) as mngr:
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(corpus, tmp_path):
    _, data = corpus
    steps, kill_after = 14, random.randint(2, 6)
    config = make_config(data, tmp_path / "unused", **{"train.steps": steps, "train.tensorboard": True})
    path = _write_config(tmp_path / "tiny_train.py", config)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    reference = _run(path, f"--config.output_dir={whole}", "--config.checkpoint.every_steps=0", wait=False)
    # The schedule is constant, so a run told to go on for long follows the same trajectory.
    victim = _run(path, f"--config.output_dir={broken}", "--config.train.steps=100000",
                  "--config.checkpoint.every_steps=1", "--config.checkpoint.max_to_keep=3", wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [int(p.name) for p in (broken / "checkpoints").glob("*") if p.name.isdigit()]
        if done and max(done) >= kill_after:
            break
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    with Checkpointer(str(broken / "checkpoints")) as ckpt:
        latest = ckpt.latest_step()
    assert kill_after <= latest < steps, (kill_after, latest)
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]

    _run(path, f"--config.output_dir={broken}", "--config.checkpoint.every_steps=1")
    resumed = json.load(open(broken / "results.json"))["results"]
    assert resumed["resumed_from"] == latest and resumed["last_checkpoint"] == steps
    a, b = _final_state(whole / "checkpoints", steps), _final_state(broken / "checkpoints", steps)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    lines = [json.loads(line) for line in open(broken / "metrics.jsonl")]
    assert [r["step"] for r in lines] == list(range(2, steps + 1, 2))  # the dead run's extra lines are gone
    for name in ("loss", "lr", "grad_norm", "tokens_per_second", "step_time_s", "accuracy"):
        assert all(np.isfinite(r[name]) for r in lines), name
    assert list((whole / "tensorboard").glob("events.out.tfevents.*"))


SHARDED_CHECK = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from tests.test_training import CFG, make_sharded_runs
    assert jax.device_count() == 8, jax.devices()
    single, sharded, specs = make_sharded_runs()
    assert any(s != () and any(a is not None for a in s) for s in specs), specs
    np.testing.assert_allclose(sharded[1], single[1], rtol=1e-5)  # loss and grad norm of every step
    # Adam divides by sqrt(nu), so where a gradient is ~0 its rounding can move that weight by a fraction of lr
    # (3e-3): nearly every weight agrees to 1e-6, none is off by more than lr / 10.
    for a, b in zip(jax.tree.leaves(single[0]), jax.tree.leaves(sharded[0])):
        diff = np.abs(np.asarray(b) - np.asarray(a))
        assert diff.max() < 3e-4 and (diff > 1e-6 + 1e-5 * np.abs(a)).mean() < 1e-3, diff.max()
    print("sharded == single")
""")


def make_sharded_runs():
    """((params after 3 steps, [loss, grad norm] per step) on 1 device, the same on a 2x2x2 mesh, the mesh PartitionSpecs used)."""
    params = init_params(CFG, jax.random.PRNGKey(0))
    batches = [packed_batch(rows=8, seed=i) for i in range(3)]
    results = []
    for mesh in ((1, 1, 1), (2, 2, 2)):
        config = make_config(ml_collections.ConfigDict({"seq_len": 32}), pathlib.Path("unused"),
                             **{"train.grad_accum": 2, "optim.weight_decay": 0.1})
        config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        s = loop.setup(config, CFG, params, LanguageModelObjective(CFG))
        p, o, rng = s.init_state(jax.tree.map(jnp.copy, params), 0)
        losses = []
        for i, batch in enumerate(batches):
            p, o, metrics = s.train_step(p, o, s.put_batch(batch), rng, jnp.int32(i))
            losses.append([float(metrics["loss"]), float(metrics["grad_norm"])])
        results.append((jax.device_get(p), np.asarray(losses)))
        specs = [tuple(x.sharding.spec) for x in jax.tree.leaves(p)]
    return results[0], results[1], specs


def test_sharded_step_on_8_cpu_devices_equals_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", SHARDED_CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded == single" in proc.stdout


@pytest.mark.parametrize("override, needle", [
    ("--config.optim.schedule=step", "optim.schedule must be one of constant, cosine, linear"),
    ("--config.train.objective=magic", "train.objective must be one of"),
    ("--config.model.param_dtype=bfloat16", "model.param_dtype (training keeps fp32 master weights"),
    ("--config.train.grad_accum=0", "train.grad_accum must be >= 1"),
    ("--config.optim.b2=1.0", "optim.b2 must be < 1.0"),
    ("--config.optim.freeze=('embed','attention')", "optim.freeze must be a tuple of groups among embed, mlp, norms"),
    ("--config.checkpoint.every_steps=-1", "checkpoint.every_steps must be >= 0"),
    ("--config.mesh.rules=(('embed', 'model'),)", "mesh.rules entries must be"),
    ("--config.data.seq_len=99999", "exceeds model.max_seq_len"),
])
def test_bad_training_config_is_one_line_exit_2(capsys, tmp_path, override, needle):
    argv = ["--config", TRAIN_CONFIG, override, f"--config.output_dir={tmp_path}", "--config.model.max_seq_len=256"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err


def test_train_export_dir_writes_the_final_weights_as_a_hugging_face_directory(corpus, tmp_path):
    """train.export_dir: the last checkpoint's parameters, bit for bit, in a directory every task can load."""
    from dmc_jax.tasks import train as train_task
    from dmc_jax.weights.hf_io import load_hf_dir

    _, data = corpus
    export_dir = tmp_path / "export"
    config = make_config(data, tmp_path / "run", **{"train.steps": 3, "train.export_dir": str(export_dir)})
    start = tiny_model()
    initial = jax.tree.map(np.array, start.params)
    summary = train_task.run(config, start)
    assert summary["export_dir"] == str(export_dir)
    cfg, params = load_hf_dir(str(export_dir))
    assert cfg.num_layers == CFG.num_layers and cfg.num_kv_heads == CFG.num_kv_heads
    want = _final_state(tmp_path / "run" / "checkpoints", 3)["params"]
    for x, y, z in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert any(not np.array_equal(np.asarray(y), z) for y, z in zip(jax.tree.leaves(want), jax.tree.leaves(initial)))


def test_init_from_continues_another_runs_state_with_this_runs_data_and_refuses_a_mismatch(corpus, tmp_path):
    tmp, data = corpus
    train = lambda cfg, model=None: loop.train(cfg, model or tiny_model(), make_objective("lm", cfg, CFG),
                                               loop.TrainData(pipeline.make_iterator(cfg.data, ByteTokenizer())))
    first = make_config(data, tmp_path / "first", **{"train.steps": 4})
    train(first)
    source = str(tmp_path / "first" / "checkpoints")
    before = sorted(os.listdir(source))

    # one step from the source's step 4 on a fresh iterator of this run's data (other options: allowed) equals
    # one update by hand
    one = make_config(data, tmp_path / "one", **{"train.steps": 5, "checkpoint.init_from": source + "/4"})
    one.data.seed = 5
    summary = train(one)
    assert summary["start_step"] == 4 and summary["last_checkpoint"] == 5
    s = loop.setup(one, CFG, tiny_model().params, make_objective("lm", one, CFG))
    with Checkpointer(source) as ck:
        state = ck.restore_state(4, s.abstract_state(tiny_model().params))
    batch = s.put_batch(next(pipeline.make_iterator(one.data, ByteTokenizer())))
    expected, _, _ = s.train_step(state["params"], state["opt_state"], batch, state["rng"], jnp.int32(4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), jax.device_get(expected),
                 _final_state(tmp_path / "one" / "checkpoints", 5)["params"])

    assert sorted(os.listdir(source)) == before  # the source directory is only read

    for value, match in [(str(tmp_path / "nowhere"), "no such directory"),
                         (source + "/3", r"holds no checkpoint step 3 \(steps there: \[2, 4\]\)")]:
        bad = make_config(data, tmp_path / "bad", **{"checkpoint.init_from": value})
        with pytest.raises(UserError, match=match):
            train(bad)
    bigger = tiny_config(vocab_size=ByteTokenizer.vocab_size, mlp_dim=CFG.mlp_dim * 2)
    bad = make_config(data, tmp_path / "bad2", **{"checkpoint.init_from": source})
    with pytest.raises(UserError, match="written for another model or optimizer") as err:
        loop.train(bad, LoadedModel(bigger, init_params(bigger, jax.random.PRNGKey(0)), ByteTokenizer(), "tiny"),
                   make_objective("lm", bad, bigger), loop.TrainData(pipeline.make_iterator(data, ByteTokenizer())))
    assert "\n" not in str(err.value)


def test_staged_run_equals_its_stages_run_by_hand_resumes_and_skips_a_finished_stage(corpus, tmp_path, capsys):
    """train.stages: one run whose later steps change data options == run 1 then run 2 warm-started from it."""
    from dmc_jax.tasks import train as train_task

    _, data = corpus
    staged = make_config(data, tmp_path / "staged", **{"train.steps": 5,
                                                        "train.stages": ("3", "5 data.seq_len=16 data.seed=3")})
    train_task.run(staged, tiny_model())
    out = capsys.readouterr().out
    assert "stage 0 (steps 1..3)" in out and "stage 1 (steps 4..5): data.seq_len=16 data.seed=3" in out
    assert Checkpointer(str(tmp_path / "staged" / "stage0" / "checkpoints")).all_steps()[-1] == 3
    rows = [json.loads(line) for line in open(tmp_path / "staged" / "stage1" / "metrics.jsonl")]
    assert [r["step"] for r in rows if "loss" in r] == [4, 5]  # the stage logs only its own steps

    first = make_config(data, tmp_path / "first", **{"train.steps": 3})
    train_task.run(first, tiny_model())
    second = make_config(data, tmp_path / "second", **{"train.steps": 5,
                                                       "checkpoint.init_from": str(tmp_path / "first" / "checkpoints")})
    second.data.seq_len, second.data.seed = 16, 3
    train_task.run(second, tiny_model())
    want = _final_state(tmp_path / "second" / "checkpoints", 5)["params"]
    got = _final_state(tmp_path / "staged" / "stage1" / "checkpoints", 5)["params"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got, want)

    # the same command again: stage 0 is skipped, stage 1 resumes at its last step (nothing to do)
    summary = train_task.run(staged, tiny_model())
    assert "stage 0 (steps 1..3): done earlier" in capsys.readouterr().out
    assert summary["last_checkpoint"] == 5 and [s["done_earlier"] for s in summary["stages"]] == [True, False]


@pytest.mark.parametrize("stages, steps, needle", [
    ("('3', '2')", 2, "ends at step 2, not after the previous stage's 3"),
    ("('3', '6 data.seqlen=16')", 6, "the config has no field data.seqlen"),
    ("('3', '6 train.steps=9')", 6, "train.steps is set by the stages themselves"),
    ("('3', '6')", 5, "train.steps=5 but train.stages ends at step 6"),
    ("('x',)", 5, "must start with the stage's last step"),
    ("('3', '6 data.seq_len=99999')", 6, "exceeds model.max_seq_len"),
    ("('3', '6 data.seq_len')", 6, "is not key=value"),
])
def test_bad_stages_are_one_line_exit_2_before_any_step(capsys, tmp_path, stages, steps, needle):
    argv = ["--config", TRAIN_CONFIG, f"--config.train.stages={stages}", f"--config.train.steps={steps}",
            f"--config.output_dir={tmp_path}", "--config.model.max_seq_len=256"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err, err
    assert not os.path.exists(tmp_path / "stage0")
