"""The method registry is the one source of truth: a method defined entirely in this file, registered here, runs
through config validation, task generate, task compare and a saved model directory without any other file knowing
it; built-in methods, legacy configs and legacy model directories keep working."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache import eviction_common as ev
from dmc_jax.cache import model_method, registry
from dmc_jax.config_loader import load_config_file
from dmc_jax.config_schema import validate
from dmc_jax.errors import UserError, require
from dmc_jax.main import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "smollm2.py")


@dataclasses.dataclass(frozen=True)
class StrideCache:
    """A toy eviction policy: keeps the tokens at multiples of `stride` first, then the most recent ones."""

    budget: int = 16
    stride: int = 2
    name: str = "toy_stride"

    def __post_init__(self):
        require(self.stride >= 1, f"cache.toy_stride.stride must be >= 1; got {self.stride}")

    def _priority(self, pos):
        return jnp.where(pos % self.stride == 0, 1e6, 0.0) + pos.astype(jnp.float32)

    def init(self, cfg, batch, max_tokens):
        return ev.init_buffers(cfg, batch, min(self.budget, max_tokens))

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope):
        out_BTHD, _, k_BTKD = ev.prompt_attention(q_BTHD, k_BTKD, v_BTKD, rope)
        B, T, K = k_BTKD.shape[:3]
        priority_BKT = jnp.broadcast_to(self._priority(jnp.arange(T)), (B, K, T))
        kept = ev.keep_top(priority_BKT, lengths_B, state["k"].shape[3], k_BTKD, v_BTKD)
        return out_BTHD, ev.write_layer(state, layer, kept)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope):
        out_BHD, state, step = ev.begin_decode(state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope)
        drop_BK = ev.masked_argmin(self._priority(step.pos_BKX), step.valid_BKX)
        return out_BHD, ev.finish_decode(state, layer, step, drop_BK)

    def stats(self, state, tokens_B):
        return ev.buffer_stats(state, tokens_B)


TOY = registry.MethodSpec(name="toy_stride", budgeted=True, defaults={"stride": 2},
                          build=lambda s, hparams: StrideCache(budget=s.budget, stride=s.stride),
                          summary="a toy defined in a test")


@pytest.fixture
def toy():
    registry.register(TOY)
    yield TOY
    registry.unregister(TOY.name)


def test_a_method_defined_in_a_test_runs_through_validation_generate_compare_and_export(toy, tmp_path):
    config = load_config_file(CONFIG)  # the config file asks the registry for every method's section
    assert config.cache.toy_stride.stride == 2
    config.task, config.model.source, config.cache.method = "generate", "tiny", "toy_stride"
    validate(config)
    config.cache.toy_stride.stride = 0
    with pytest.raises(UserError, match=r"cache\.toy_stride\.stride must be >= 1"):
        validate(config)

    common = ["--config", CONFIG, "--config.model.source=tiny", "--config.model.max_seq_len=0"]
    out = tmp_path / "gen"
    assert main(common + ["--config.task=generate", "--config.cache.method=toy_stride", "--config.cache.budget=8",
                          "--config.cache.toy_stride.stride=3", "--config.generate.max_new_tokens=6",
                          "--config.generate.chat=False", "--config.generate.prompt=" + "abcdefghij" * 2,
                          f"--config.output_dir={out}"]) == 0
    res = json.loads((out / "results.json").read_text())["results"]
    assert res["cache_method"] == "toy_stride" and res["new_tokens"] == 6

    out = tmp_path / "compare"
    assert main(common + ["--config.task=compare", f"--config.output_dir={out}", "--config.compare.context=64",
                          "--config.compare.prefix=8", "--config.compare.ppl_sequences=2", "--config.compare.batch=2",
                          "--config.compare.ratios=(4,)", "--config.compare.methods=('dense','toy_stride')",
                          "--config.compare.kv_heads=()", "--config.compare.evals=('ppl',)",
                          "--config.compare.min_budget=8"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [(r["model"], r["method"], r["budget"]) for r in rows] == [("base", "dense", None),
                                                                      ("base", "toy_stride", 16)]
    assert abs(rows[1]["logical_cr"] - 4.0) < 1e-6 and rows[1]["bytes_cr"] > 3
    toy_ppl = rows[1]["ppl"]

    # A model directory records the method; cache.method 'auto' (the default) serves the model with it.
    from dmc_jax.tasks.common import tiny_model
    model = tiny_model(0)
    section = ml_collections.ConfigDict({"toy_stride": {"stride": 5}})
    model_dir = str(tmp_path / "toy_model")
    model_method.save(model_dir, model.cfg, jax.tree.map(np.asarray, model.params), model.tokenizer, "toy_stride",
                      cache=section)
    saved = json.loads(open(os.path.join(model_dir, model_method.METHOD_FILE)).read())
    assert saved["method"] == "toy_stride" and saved["cache"]["stride"] == 5
    config = load_config_file(CONFIG)
    config.model.source = model_dir
    assert model_method.make(config) == StrideCache(budget=256, stride=2)  # the config's section sizes it
    out = tmp_path / "compare_dir"
    assert main(common + ["--config.task=compare", f"--config.output_dir={out}", "--config.compare.context=64",
                          "--config.compare.prefix=8", "--config.compare.ppl_sequences=2", "--config.compare.batch=2",
                          "--config.compare.ratios=(4,)", "--config.compare.methods=('dense',)",
                          "--config.compare.kv_heads=()", "--config.compare.evals=('ppl',)",
                          "--config.compare.min_budget=8", f"--config.compare.extra_models=('toy|{model_dir}|auto',)"]) == 0
    rows = json.loads((out / "results.json").read_text())["results"]["rows"]
    assert [(r["model"], r["method"], r["ratio"]) for r in rows] == [("base", "dense", 1), ("toy", "toy_stride", 4)]
    assert rows[1]["ppl"] == pytest.approx(toy_ppl, rel=1e-6)  # the same weights: the base model's toy row


def test_a_model_directory_naming_an_unknown_method_is_one_line(tmp_path):
    (tmp_path / model_method.METHOD_FILE).write_text(json.dumps({"format": 1, "method": "toy_stride"}))
    with pytest.raises(UserError, match="names cache method 'toy_stride', which this installation does not have"):
        model_method.read(str(tmp_path))


def test_a_legacy_dmc_config_json_still_loads_and_wrong_types_name_the_file(tmp_path):
    from dmc_jax.cache.dmc_paged import DMCPagedCache

    (tmp_path / "dmc_config.json").write_text(json.dumps({"target_cr": 4, "decision_offset": -1.0, "window": 6}))
    saved = model_method.read(str(tmp_path))
    assert saved.method == "dmc_paged" and saved.hparams.target_cr == 4.0 and saved.hparams.window == 6
    config = load_config_file(CONFIG)
    config.model.source = str(tmp_path)
    method = model_method.make(config)
    assert isinstance(method, DMCPagedCache) and method.target_cr == 4.0 and method.dmc.window == 6
    (tmp_path / "dmc_config.json").write_text(json.dumps({"target_cr": "four"}))
    with pytest.raises(UserError, match=r"dmc_config\.json: field 'target_cr' must be float like 2\.0, got 'four'"):
        model_method.read(str(tmp_path))
    (tmp_path / "dmc_config.json").write_text(json.dumps({"target_cr": 0.5}))
    with pytest.raises(UserError, match=r"dmc_config\.json holds a bad value: dmc\.target_cr must be >= 1"):
        model_method.read(str(tmp_path))


def test_every_builtin_method_is_registered_with_consistent_traits():
    names = registry.names()
    assert names[:1] == ("dense",) and {"h2o", "tova", "snapkv", "streaming_llm", "corm", "dmc_paged"} <= set(names)
    cache = registry.default_config()
    for name in names:
        spec = registry.get(name)
        assert not (spec.budgeted and spec.adaptive), name
        method = registry.build(name, cache)
        assert method.name == name
        if spec.trained is not None:
            assert registry.get(spec.trained.serve_method).trained is spec.trained
    assert set(registry.trained_sections()) == {"dmc", "dms"}
    with pytest.raises(UserError, match="cache.method must be one of auto, dense"):
        registry.get("magic")
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(dataclasses.replace(registry.get("h2o")))


def test_task_methods_lists_every_registered_method(toy, tmp_path, capsys):
    assert main(["--config", CONFIG, "--config.task=methods", f"--config.output_dir={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "| toy_stride | budgeted | stride=2 | a toy defined in a test |" in printed
    assert "| dmc_paged | trained (dmc section) |" in printed
    listed = json.loads((tmp_path / "results.json").read_text())["results"]["methods"]
    assert list(listed) == list(registry.names()) and listed["h2o"]["defaults"] == {"recent_ratio": 0.5}
