"""Task plan: architectures by name, the analytic per-device memory, its agreement with XLA's memory analysis of the
compiled sharded step for scaled-down models (8 fake CPU devices), and the Llama 2 70B report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from dmc_jax.config_loader import load_config_file
from dmc_jax.errors import UserError
from dmc_jax.main import main
from dmc_jax.tasks import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A scaled-down Llama (4 layers, GQA 8:4) whose compile takes seconds.
SMALL = "llama2_7b,num_layers=4,embed_dim=512,num_heads=8,num_kv_heads=4,head_dim=64,mlp_dim=1408,vocab_size=4096"
# Stated tolerance: arguments (weights, AdamW state, batch) exact to 1%; the analytic peak within -20% / +25% of the
# compiled peak (arguments + outputs - aliases + temporaries). Measured analytic / compiled: 0.98 .. 1.05 for
# remat none / full / dots_with_no_batch_dims, LM and DMC, fp32 and bf16, meshes 1x4x2, 2x2x2, 8x1x1, 1x2x4;
# 1.22 for 'dots' (XLA keeps fewer of the dot outputs than the policy allows).
PEAK_RATIO = (0.8, 1.25)


def small_config(mesh=(1, 4, 2), remat="full", objective="dmc", grad_accum=1, dtype="float32", arch=SMALL):
    c = load_config_file(os.path.join(ROOT, "configs", "llama2_7b_dmc.py:cr4"))
    c.task = "plan"
    c.plan.arch = arch
    c.model.update(remat=False, remat_policy=remat, compute_dtype=dtype, max_seq_len=0)
    c.data.update(batch_size=16, seq_len=256)
    c.train.update(objective=objective, grad_accum=grad_accum)
    c.mesh.update(data=mesh[0], fsdp=mesh[1], tensor=mesh[2])
    return c


def test_architectures_by_name_and_errors():
    c = small_config(arch="")
    for source, layers in (("meta-llama/Llama-2-70b-hf", 80), ("/models/Meta-Llama-3-8B", 32),
                           ("Llama-2-13b-hf", 40)):
        c.model.source = source
        assert plan.architecture(c).num_layers == layers
    c.model.source = "/nowhere/unknown-model"
    with pytest.raises(UserError, match="plan.arch"):
        plan.architecture(c)
    assert plan.architecture(small_config()).embed_dim == 512
    assert plan.architecture(small_config()).remat_policy == "full"


def test_analytic_memory_splits_with_the_mesh_and_shrinks_with_remat():
    one = plan.analytic(plan.architecture(c := small_config(mesh=(1, 1, 1))), c)
    fsdp = plan.analytic(plan.architecture(c := small_config(mesh=(1, 8, 1))), c)
    assert fsdp["params"] == pytest.approx(one["params"] / 8)  # every dimension it shards divides by 8
    assert fsdp["opt_state"] == pytest.approx(2 * fsdp["params"])
    full = plan.analytic(plan.architecture(c := small_config(remat="full")), c)
    none = plan.analytic(plan.architecture(c := small_config(remat="none")), c)
    dots = plan.analytic(plan.architecture(c := small_config(remat="dots")), c)
    assert full["activations_saved"] < dots["activations_saved"] < none["activations_saved"]


COMPARE = textwrap.dedent("""
    import json, jax
    from tests.test_plan import small_config
    from dmc_jax.tasks import plan
    assert jax.device_count() == 8
    for case in json.loads(%r):
        c = small_config(**case)
        est, comp = plan.analytic(plan.architecture(c), c), plan.compile_memory(c)
        print("case", json.dumps({"case": case, "args": est["params"] + est["opt_state"] + est["batch"],
                                  "est_peak": est["peak"], "argument": comp["argument"], "peak": comp["peak"]}),
              flush=True)
""")


@pytest.mark.slow
def test_analytic_numbers_match_the_compiled_memory_analysis_of_scaled_down_models():
    cases = [dict(mesh=(1, 4, 2), remat="none", objective="lm"),
             dict(mesh=(2, 2, 2), remat="full", objective="dmc", grad_accum=2),
             dict(mesh=(1, 4, 2), remat="full", objective="dmc", dtype="bfloat16")]
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, "-c", COMPARE % json.dumps(cases)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line[5:]) for line in proc.stdout.splitlines() if line.startswith("case ")]
    assert len(rows) == len(cases)
    for r in rows:
        assert r["args"] == pytest.approx(r["argument"], rel=0.01), r
        assert PEAK_RATIO[0] <= r["est_peak"] / r["peak"] <= PEAK_RATIO[1], r


def test_plan_task_reports_llama2_70b_on_64_h100(tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs", "llama2_70b_dmc.py:cr4"), "--config.task=plan",
            "--config.plan.compile=False", f"--config.output_dir={tmp_path}"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 8} (64 devices)" in out and "fits" in out, out
    results = json.load(open(tmp_path / "results.json"))["results"]
    est = results["analytic"]
    assert results["fits"] and est["peak"] < 76e9
    assert est["params"] == pytest.approx(results["num_params"] * 4 / 64, rel=0.01)  # every weight split 64 ways
    assert (tmp_path / "plan.txt").read_text().startswith("plan: 68.98B parameters")


def test_plan_needs_the_cluster_size_for_a_minus_one_mesh(tmp_path, capsys):
    argv = ["--config", os.path.join(ROOT, "configs", "llama2_70b_dmc.py:cr4"), "--config.task=plan",
            "--config.plan.devices=0", f"--config.output_dir={tmp_path}"]
    assert main(argv) == 2
    assert "set plan.devices" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["llama2_7b_dmc", "llama2_13b_dmc", "llama2_70b_dmc", "llama3_8b_dmc"])
def test_every_cluster_config_fits_an_80gb_gpu_on_its_planned_cluster(name):
    c = load_config_file(os.path.join(ROOT, "configs", f"{name}.py:cr8"))
    c.task = "plan"
    plan.validate(c)
    est = plan.analytic(plan.architecture(c), c)
    assert est["peak"] < (c.plan.hbm_gb - c.plan.reserve_gb) * 1e9, (name, est)
    assert c.data.batch_size % (c.train.grad_accum * est["mesh"]["data"] * est["mesh"]["fsdp"]) == 0


def test_plan_compiles_a_distillation_step_with_its_teacher_as_an_argument():
    """A distillation config (DMS/DMC by KL to the frozen original) passes its teacher to the step: the plan's
    compile gives it the teacher's shapes, and the compiled arguments hold the teacher's weights in the compute
    dtype on top of the student's weights, AdamW moments and batch."""
    from dmc_jax.training import distill

    def config(distilled: bool):
        c = small_config(mesh=(1, 1, 1), remat="full", objective="dmc", dtype="bfloat16")
        c.data.update(batch_size=2, seq_len=64)
        if distilled:
            c.distill = distill.default_config()
            distill.apply_recipe(c, base_lr_scale=0.1)
        return c

    plain, taught = (plan.compile_memory(config(d))["argument"] for d in (False, True))
    teacher_bytes = plan.architecture(small_config()).num_params() * 2  # bf16 copies (norm scales fp32: ~0)
    assert taught - plain == pytest.approx(teacher_bytes, rel=0.01)
    c = config(True)
    est = plan.analytic(plan.architecture(c), c)  # the analytic plan counts the same teacher
    assert est["teacher"] == pytest.approx(taught - plain, rel=0.01)
    assert plan.analytic(plan.architecture(config(False)), config(False))["teacher"] == 0
