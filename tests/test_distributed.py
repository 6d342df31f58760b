"""Multi-device and multi-process training: the process-group plan (explicit, launcher, SLURM), hybrid (ici x dcn)
meshes, sharded step == one device for several meshes, 2 processes x 4 CPU devices == 1 process x 8 (loss curve),
and a checkpoint written by 2 processes restored by 1 process on another mesh."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dmc_jax.errors import UserError
from dmc_jax.training import distributed, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU8 = dict(os.environ, JAX_PLATFORMS="cpu",
            XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")


def _config(**fields):
    import ml_collections

    c = ml_collections.ConfigDict()
    c.distributed = distributed.default_config()
    c.distributed.update(fields)
    return c


def test_plan_explicit_launcher_slurm_single_and_errors():
    p = distributed.plan(_config(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3,
                                 local_device_ids="0,1"), environ={})
    assert p.source == "explicit" and p.kwargs == dict(coordinator_address="10.0.0.1:1234", num_processes=4,
                                                       process_id=3, local_device_ids=[0, 1],
                                                       initialization_timeout=300)
    env = {distributed.ENV_COORDINATOR: "127.0.0.1:9", distributed.ENV_NUM_PROCESSES: "2",
           distributed.ENV_PROCESS_ID: "1"}
    p = distributed.plan(_config(), environ=env)
    assert p.source == "launcher" and (p.kwargs["num_processes"], p.kwargs["process_id"]) == (2, 1)
    slurm = dict(SLURM_JOB_ID="7", SLURM_STEP_NODELIST="gpu[001-004]", SLURM_NTASKS="32", SLURM_PROCID="9",
                 SLURM_LOCALID="1")
    p = distributed.plan(_config(), environ=slurm)
    assert p.source == "slurm" and p.kwargs["cluster_detection_method"] == "slurm"
    assert distributed.plan(_config(), environ=dict(slurm, SLURM_NTASKS="1")).source == "single"
    assert distributed.plan(_config(cluster="none"), environ=slurm).source == "single"
    assert distributed.plan(None, environ={}).source == "single" and not distributed.plan(None, {}).multi_process
    with pytest.raises(UserError, match="does not run under srun"):
        distributed.plan(_config(cluster="slurm"), environ={})
    with pytest.raises(UserError, match="distributed.num_processes"):
        distributed.plan(_config(coordinator_address="h:1"), environ={})
    with pytest.raises(UserError, match="host:port"):
        distributed.validate(_config(coordinator_address="nohost"))
    with pytest.raises(UserError, match="distributed.cluster must be one of"):
        distributed.validate(_config(cluster="k8s"))


def test_hybrid_mesh_keeps_ici_axes_inside_a_node():
    Dev = collections.namedtuple("Dev", "process_index id")
    devices = [Dev(p, p * 4 + i) for p in range(4) for i in range(4)]  # 4 nodes x 4 devices
    arr = sharding.hybrid_devices(devices[::-1], [4, 2, 2], [2, 1, 1])  # data spans 2 node groups
    node = np.vectorize(lambda d: d.id // 8)(arr)  # granule = 8 consecutive devices (2 processes)
    assert arr.shape == (4, 2, 2)
    np.testing.assert_array_equal(node[:2], 0)
    np.testing.assert_array_equal(node[2:], 1)
    assert sorted(d.id for d in arr.ravel()) == list(range(16))


SEVERAL_MESHES = textwrap.dedent("""
    import jax, jax.numpy as jnp, ml_collections, numpy as np, pathlib
    from tests.test_training import CFG, make_config, packed_batch
    from dmc_jax.model.params import init_params
    from dmc_jax.training import loop
    from dmc_jax.training.objective import LanguageModelObjective
    assert jax.device_count() == 8
    params = init_params(CFG, jax.random.PRNGKey(0))
    batches = [packed_batch(rows=16, seed=i) for i in range(2)]

    def run(mesh):
        config = make_config(ml_collections.ConfigDict({"seq_len": 32}), pathlib.Path("unused"),
                             **{"train.grad_accum": 2, "optim.weight_decay": 0.1})
        config.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
        s = loop.setup(config, CFG, params, LanguageModelObjective(CFG))
        p, o, rng = s.init_state(jax.tree.map(jnp.copy, params), 0)
        losses = []
        for i, b in enumerate(batches):
            p, o, m = s.train_step(p, o, s.put_batch(b), rng, jnp.int32(i))
            losses.append([float(m["loss"]), float(m["grad_norm"])])
        return jax.device_get(p), np.asarray(losses), {str(x.sharding.spec) for x in jax.tree.leaves(p)}

    ref_p, ref_l, _ = run((1, 1, 1))
    for mesh in ((8, 1, 1), (1, 8, 1), (1, 2, 4), (2, 2, 2)):
        p, l, specs = run(mesh)
        assert any(a in s for s in specs for a in ("data", "fsdp", "tensor")) or mesh == (8, 1, 1), (mesh, specs)
        np.testing.assert_allclose(l, ref_l, rtol=2e-5, err_msg=str(mesh))
        for a, b in zip(jax.tree.leaves(ref_p), jax.tree.leaves(p)):
            diff = np.abs(np.asarray(b) - np.asarray(a))
            assert diff.max() < 3e-4 and (diff > 1e-6 + 1e-5 * np.abs(a)).mean() < 1e-3, (mesh, diff.max())
        print("equal", mesh, flush=True)
""")


@pytest.mark.slow
def test_sharded_step_equals_one_device_for_data_fsdp_tensor_and_mixed_meshes():
    proc = subprocess.run([sys.executable, "-c", SEVERAL_MESHES], cwd=ROOT, env=CPU8, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("equal") == 4, proc.stdout


def _losses(run_dir) -> np.ndarray:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return np.asarray([[r["step"], r["loss"], r["ce"], r["cr"], r["grad_norm"]] for r in rows])


@pytest.mark.slow
def test_two_processes_equal_one_and_their_checkpoint_restores_in_one_process_on_another_mesh(tmp_path):
    worker = [sys.executable, "-m", "tests.distributed_worker"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    proc = subprocess.run(worker + ["train", one, "2,2,2"], cwd=ROOT, env=CPU8, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "--num_processes", "2",
                "--cpu_devices", "4", "--timeout", "600", "--"]
    proc = subprocess.run(launcher + worker + ["train", two, "2,2,2", "2"], cwd=ROOT, capture_output=True,
                          text=True, timeout=700)  # dcn_data=2: the data axis spans the two processes
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "[0] process 0 of 2: 4 local of 8 cpu devices" in proc.stdout, _tail(proc.stdout)
    assert "[1] summary" in proc.stdout and "[0] summary" in proc.stdout

    a, b = _losses(one), _losses(two)  # process 0 alone writes metrics: one line per step
    assert a.shape == b.shape == (6, 5)
    assert a[-1, 3] > 1.01  # DMC stage 2 reached: some tokens were merged
    np.testing.assert_allclose(b, a, rtol=1e-5)

    proc = subprocess.run(worker + ["restore", os.path.join(two, "checkpoints"), "1,4,2"], cwd=ROOT, env=CPU8,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored = json.loads(proc.stdout.split("restored ", 1)[1])
    mesh, single = restored["mesh"], restored["one_device"]
    assert mesh["step"] == 6 and mesh["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
    assert "fsdp" in mesh["specs"]["['layers']['q']"] and "tensor" in mesh["specs"]["['layers']['q']"]
    assert mesh["params"] == single["params"] and mesh["sums"] == single["sums"]  # exact, whatever the mesh
    proc = subprocess.run(worker + ["restore", os.path.join(one, "checkpoints"), "8,1,1"], cwd=ROOT, env=CPU8,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = json.loads(proc.stdout.split("restored ", 1)[1])["mesh"]
    for name, values in reference["params"].items():  # 2-process training == 1-process training
        np.testing.assert_allclose(mesh["params"][name], values, rtol=1e-4, atol=1e-5, err_msg=name)


def test_optimizer_state_offloaded_to_host_trains_the_same_and_checkpoints(tmp_path):
    import jax
    import jax.numpy as jnp
    import ml_collections

    from dmc_jax.model.params import init_params
    from dmc_jax.training import loop
    from dmc_jax.training.checkpoint import Checkpointer
    from dmc_jax.training.objective import LanguageModelObjective
    from tests.test_training import CFG, make_config, packed_batch

    params = init_params(CFG, jax.random.PRNGKey(0))
    runs = []
    for offload in (False, True):
        config = make_config(ml_collections.ConfigDict({"seq_len": 32}), tmp_path / "unused")
        config.train.offload_opt_state = offload
        s = loop.setup(config, CFG, params, LanguageModelObjective(CFG))
        p, o, rng = s.init_state(jax.tree.map(jnp.copy, params), 0)
        for i in range(3):
            p, o, _ = s.train_step(p, o, s.put_batch(packed_batch(rows=4, seed=i)), rng, jnp.int32(i))
        kinds = {x.sharding.memory_kind for x in jax.tree.leaves(o)}
        runs.append((jax.device_get(p), jax.device_get(o), kinds))
    assert runs[1][2] == {"pinned_host"} and "pinned_host" not in runs[0][2]
    for a, b in zip(jax.tree.leaves(runs[0][:2]), jax.tree.leaves(runs[1][:2])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
    state = {"params": p, "opt_state": o, "rng": rng}
    with Checkpointer(str(tmp_path / "ckpt")) as ckpt:  # the offloaded state saves and restores in host memory
        import grain

        it = iter(grain.MapDataset.source([1, 2]).to_iter_dataset())
        ckpt.save(1, state, it, {})
        ckpt.wait()
        restored = ckpt.restore_state(1, s.abstract_state(params))
    assert {x.sharding.memory_kind for x in jax.tree.leaves(restored["opt_state"])} == {"pinned_host"}
    for a, b in zip(jax.tree.leaves(jax.device_get(state)), jax.tree.leaves(jax.device_get(restored))):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))


def _tail(stdout: str, lines: int = 40) -> str:
    """The launcher's output for a failure message: every error-looking line, then each process's last `lines`
    lines (so a hang shows both processes' stacks), without gloo's connection lines, faulthandler's module list and
    jax's compile log."""
    kept = [line for line in stdout.splitlines()
            if line.strip() and not any(w in line for w in ("[Gloo] Rank", "Extension modules:", "<frozen runpy>",
                                                            "WARNING:jax._src"))]
    errors = [line for line in kept if any(w in line for w in ("rror", "DEADLINE", "timed out", "Gloo"))]
    parts = ["errors:"] + errors[-20:]
    for i in sorted({line[1:line.index("]")] for line in kept if line.startswith("[") and "]" in line}):
        mine = [line for line in kept if line.startswith(f"[{i}]")]
        parts += [f"process {i}, last {lines} lines:"] + mine[-lines:]
    other = [line for line in kept if not line.startswith("[")]
    return "\n".join(parts + ["launcher:"] + other[-5:])


@pytest.mark.slow
def test_a_process_that_compiles_35_s_longer_does_not_break_the_first_collective():
    """The last process reaches a jitted reduce-scatter 35 s after the other (as when one compiles and the other
    finds the program in the persistent cache). Called plainly this fails: gloo's context setup gives up after 30 s
    and the failed process then hangs at exit (what CI saw as a launcher timeout; run the worker with 'plain' to
    see it). Through distributed.LinedUp (compile, then a coordination-service barrier, then run) both finish with
    the right sum."""
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "--num_processes", "2",
                "--cpu_devices", "2", "--timeout", "150", "--", sys.executable, "-m", "tests.distributed_worker",
                "skew", "lined_up", "35"]
    proc = subprocess.run(launcher, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert proc.returncode == 0, _tail(proc.stdout)
    rows = [json.loads(line.split("skew ", 1)[1]) for line in proc.stdout.splitlines() if "] skew {" in line]
    assert sorted(r["process"] for r in rows) == [0, 1], _tail(proc.stdout)
    assert all(r["sum"] == sum(range(16)) for r in rows)
    assert max(r["seconds"] for r in rows) > 30  # the early process did wait for the late one


@pytest.mark.slow
def test_train_task_through_the_launcher_on_two_processes(tmp_path):
    """python launch/local_multiprocess.py -- python -m dmc_jax.main ...: tiny DMC model, real data pipeline; then
    a damaged checkpoint found and skipped by both processes."""
    from dmc_jax.data.prepare import prepare
    from dmc_jax.dmc.objective import default_config as dmc_default_config
    from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer
    from tests.test_data_helpers import data_config, write_corpus
    from tests.test_training import _write_config, make_config

    data = data_config(tmp_path, write_corpus(tmp_path / "corpus", num_files=3, paragraphs_per_file=30))
    prepare(data, ByteTokenizer())
    data.batch_size = 8
    out = tmp_path / "run"
    config = make_config(data, out, **{"train.steps": 4, "train.objective": "dmc", "train.grad_accum": 2,
                                       "checkpoint.every_steps": 2})
    config.dmc = dmc_default_config()
    config.dmc.update(zero_out_steps=1, retrofit_steps=2, decision_offset=2.0)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    path = _write_config(tmp_path / "tiny_dmc.py", config)
    launcher = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "--num_processes", "2",
                "--cpu_devices", "4", "--timeout", "300", "--", sys.executable, "-m", "dmc_jax.main", "--config", path]
    proc = subprocess.run(launcher, cwd=ROOT, capture_output=True, text=True, timeout=400)
    (tmp_path / "launch-1.log").write_text(proc.stdout)  # the whole output, kept with pytest's last temp dirs
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "[1] process 1 of 2: 4 local of 8 cpu devices" in proc.stdout, _tail(proc.stdout)
    results = json.load(open(out / "results.json"))["results"]
    assert results["last_checkpoint"] == 4 and results["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [2, 4]  # process 0 alone writes metrics
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]

    # A flipped bit in step 4: process 0 finds it, moves the step aside, and both processes resume from step 2.
    biggest = max((p for p in (out / "checkpoints" / "4" / "state").rglob("*") if p.is_file()),
                  key=lambda p: p.stat().st_size)
    raw = bytearray(biggest.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    biggest.write_bytes(bytes(raw))
    # jax logs each program it takes from the persistent cache (conftest sets one): on CPU with several
    # processes it is off (distributed._no_persistent_cache_on_cpu): process 0 runs no earlier launch's build.
    proc = subprocess.run(launcher + ["--config.train.steps=6"], cwd=ROOT, capture_output=True, text=True,
                          timeout=400, env=dict(os.environ, JAX_LOG_COMPILES="1"))
    (tmp_path / "launch-2.log").write_text(proc.stdout)
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "[0] checkpoint step 4 is damaged" in proc.stdout, _tail(proc.stdout)
    assert "compilation cache hit" not in proc.stdout.lower(), _tail(proc.stdout)
    results = json.load(open(out / "results.json"))["results"]
    assert results["resumed_from"] == 2 and results["last_checkpoint"] == 6
    assert (out / "checkpoints" / "damaged" / "4").is_dir()
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [2, 4, 6]


def test_launcher_stops_the_others_when_one_fails_and_prints_stacks_on_timeout():
    """Process 1 fails while process 0 would sleep for a minute: the launcher returns process 1's code within
    seconds. A hang past --timeout prints each process's Python stack (faulthandler) and exits 124."""
    import time

    launcher = [sys.executable, os.path.join(ROOT, "launch", "local_multiprocess.py"), "--num_processes", "2"]
    fail = ("import os, sys, time\nif os.environ['DMC_JAX_PROCESS_ID'] == '1': sys.exit(3)\ntime.sleep(60)")
    t0 = time.monotonic()
    proc = subprocess.run(launcher + ["--", sys.executable, "-c", fail], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 3 and time.monotonic() - t0 < 30, proc.stdout
    hang = "import time\ndef waiting_forever():\n    time.sleep(60)\nwaiting_forever()"
    proc = subprocess.run(launcher + ["--timeout", "3", "--", sys.executable, "-c", hang], capture_output=True,
                          text=True, timeout=50)
    assert proc.returncode == 124 and "timed out after 3 s" in proc.stdout, proc.stdout
    assert "[0]" in proc.stdout and "[1]" in proc.stdout and "waiting_forever" in proc.stdout, proc.stdout
