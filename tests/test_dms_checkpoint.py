"""A Qwen3 DMS directory laid out like nvidia/Qwen3-8B-DMS-8x (decisions from a query channel), or like a
Model-Optimizer export with decision adapters, loads as method 'dms' and computes what the DMS reference computes:
logits and per-token decisions of NVIDIA Model-Optimizer's Qwen3ForCausalLMDMS prefill (fp32).

Fixtures: tests/fixtures/tiny_qwen3_dms{,_adapter}/ (bfloat16 tensors + config.json with the DMS fields) and
tiny_qwen3_dms_reference.npz, written by make_qwen3_dms_reference.py in the torch fixture environment.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache import model_method
from dmc_jax.cache.dms import DMSCache
from dmc_jax.dms.attention import DMSAttention
from dmc_jax.dms.config import from_section
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.weights.hf_io import load_hf_dir
from tests.jitted import prefill_then_decode

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
DIR = os.path.join(FIX, "tiny_qwen3_dms")
REF = np.load(os.path.join(FIX, "tiny_qwen3_dms_reference.npz"))
# (directory, prefix of its reference arrays in REF)
MODELS = {"release": (DIR, ""), "adapter": (DIR + "_adapter", "adapter_")}


def _load(d=DIR):
    cfg, params = load_hf_dir(d)
    return cfg, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # fp32 compute from the bf16 weights


def _config(source, method="auto", **dms_cache):
    return ml_collections.ConfigDict({"model": {"source": source}, "cache": {"method": method, "dms": dms_cache}})


def test_directory_resolves_to_the_dms_method_with_its_settings():
    cfg, params = load_hf_dir(DIR)
    assert cfg.qk_norm and cfg.param_dtype == "bfloat16" and params["layers"]["q"].dtype == jnp.bfloat16
    method = model_method.make(_config(DIR))
    assert isinstance(method, DMSCache)
    assert (method.dms.window, method.dms.decision_scale, method.dms.decision_offset) == (8, 100.0, 5.0)
    assert method.dms.decision_channel == -1 and method.dms.zero_after_rope and method.target_cr == 8.0
    assert method.init(cfg, 1, 40)["k"].shape[3] == 9 + 5  # w + 1 slots + ceil(31 tokens / CR 8 x margin 1.25)


def test_adapter_directory_loads_its_adapter():
    cfg, params = load_hf_dir(MODELS["adapter"][0])
    assert cfg.dms_adapter and params["layers"]["dms_adapter"].shape == (2, 64, 2)  # [L, D, K]
    assert params["layers"]["dms_adapter_norm"].shape == (2, 64)
    method = model_method.make(_config(MODELS["adapter"][0]))
    assert method.dms.decision == "adapter" and method.dms.window == 8 and method.target_cr == 8.0
    assert not load_hf_dir(DIR)[0].dms_adapter and model_method.make(_config(DIR)).dms.decision == "q_channel"


@pytest.mark.parametrize("model", sorted(MODELS))
def test_logits_and_decisions_match_the_reference(model):
    d, ref = MODELS[model]
    cfg, params = _load(d)
    ids = jnp.asarray(REF["input_ids"])
    dms = from_section(model_method.read(d).hparams).replace(mode="hard")
    logits, aux = llama.forward_aux(params, ids, cfg, attention=DMSAttention(dms))
    np.testing.assert_allclose(np.asarray(logits), REF[ref + "logits"], atol=1e-4, rtol=1e-4)
    # reference: decisions[L, B, K, T] = a_t > 0 (token t marks t - 1; token 0 marks nothing, so t >= 1 counts)
    ours_LBKT = (np.asarray(aux["alpha_st_BTK"]) > 0.5).transpose(0, 1, 3, 2)  # straight-through: 1 - 6e-8
    np.testing.assert_array_equal(ours_LBKT[..., 1:], REF[ref + "decisions"][..., 1:] > 0)
    assert 0.2 < REF[ref + "decisions"][..., 1:].mean() < 0.8  # a real mix: eviction is exercised, not vacuous
    keep = llama.forward_aux(params, ids, cfg, attention=DMSAttention(dms.replace(mode="keep")))[0]
    assert np.abs(np.asarray(keep) - REF[ref + "logits"]).max() > 1e-2  # the window (8 < 40) evicts something


@pytest.mark.parametrize("model", sorted(MODELS))
def test_cache_method_auto_serves_it_like_the_reference(model):
    """cache.method 'auto' on the directory: prefill 16 tokens, decode the rest token by token; every logit is
    the reference prefill's logit at that position (the reference's prefill is exact DMS inference). The random
    tiny model marks about half its tokens, not 7/8 as dms_cr=8 says: the buffer gets room for all 40 tokens."""
    d, ref = MODELS[model]
    cfg, params = _load(d)
    params = llama.unstack_layers(params)
    method = model_method.make(_config(d, capacity=40))
    ids = jnp.asarray(REF["input_ids"])
    B, T, P = ids.shape[0], ids.shape[1], 16
    got, state = prefill_then_decode(params, cfg, method, ids, P)  # [B, T - P + 1, V]
    np.testing.assert_allclose(got[:, :-1], REF[ref + "logits"][:, P - 1:T - 1], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[:, -1], REF[ref + "logits"][:, T - 1], atol=1e-4, rtol=1e-4)
    method.check(state)
    stats = method.stats(state, jnp.full((B,), T))
    assert float(stats["compression_ratio"]) > 1.2  # tokens left the cache


def _with(tmp_path, **fields):
    d = str(tmp_path / "m")
    shutil.copytree(DIR, d)
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg.update(fields)
    for k in [k for k, v in fields.items() if v is ...]:
        del cfg[k]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    return d


@pytest.mark.parametrize("fields, match", [
    ({"dms_separate_alpha": True}, r"missing tensor model.layers.0.self_attn.dms_proj_alpha.weight"),
    ({"dms_separate_alpha": "yes"}, r"dms_separate_alpha must be true or false, got 'yes'"),
    ({"dms_alpha_per": "layer"}, r"dms_alpha_per='layer' cannot be honoured"),
    ({"dms_disable_eviction": True}, r"dms_disable_eviction=True cannot be honoured"),
    ({"dms_new_thing": 3}, r"DMS field dms_new_thing=3 is not known"),
    ({"dms_window_size": "512"}, r"dms_window_size must be an integer, got '512'"),
    ({"dms_window_size": ...}, r"no dms_window_size"),
    ({"dms_alpha_scale": 0}, r"dms_alpha_scale must be > 0, got 0.0"),
    ({"dms_window_size": 600}, r"dms.window=600 is not shorter than the model's context"),
])
def test_fields_we_cannot_honour_are_one_line_errors(tmp_path, fields, match):
    d = _with(tmp_path, **fields)
    with pytest.raises(UserError, match=match) as e:
        model_method.make(_config(d)).init(load_hf_dir(d)[0], 1, 8)
    assert "\n" not in str(e.value)


def test_reference_settings_that_change_nothing_are_accepted_and_kv_method_json_wins(tmp_path):
    d = _with(tmp_path, dms_paged_attention_block_size=256, dms_chunked_prefill=None, dms_separate_alpha=False,
              dms_alpha_per="head", dms_tau=0.1, dms_compile_limit=72)
    assert model_method.read(d).method == "dms"
    load_hf_dir(d)
    with open(os.path.join(d, "kv_method.json"), "w") as f:
        json.dump({"format": 1, "method": "dms", "hparams": {"window": 4}}, f)
    assert model_method.make(_config(d)).dms.window == 4
    assert model_method.resolve(_config(d, "dense")).name == "dense"
    assert model_method.read(os.path.join(FIX, "tiny_qwen3_untied")) is None  # a plain Qwen3 stays dense


def test_generate_task_serves_the_directory_with_its_dms_cache(tmp_path, capsys):
    """The CLI path: model.source=<dir> (plus a 256-byte tokenizer), cache.method 'auto' -> the DMS cache; an
    undersized buffer (CR 8 for a random model that evicts ~half) is a one-line error, never a silent result."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from dmc_jax.main import main

    d = _with(tmp_path)
    t = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                             merges=[]))
    t.pre_tokenizer, t.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    t.save(os.path.join(d, "tokenizer.json"))
    config = os.path.join(os.path.dirname(FIX), "..", "configs", "smollm2.py")
    argv = ["--config", config, "--config.task=generate", f"--config.model.source={d}", "--config.generate.chat=False",
            "--config.generate.max_new_tokens=20", "--config.model.max_seq_len=128",
            f"--config.output_dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    assert "DMS cache overflow at prefill" in capsys.readouterr().err
    assert main(argv + ["--config.cache.dms.capacity=128"]) == 0
    results = json.load(open(tmp_path / "out" / "results.json"))["results"]
    assert results["cache_method"] == "dms" and 1 <= len(results["samples"][0]["completion_ids"]) <= 20
