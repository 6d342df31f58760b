"""Our Hugging Face exporter writes a checkpoint that transformers loads with the same logits as ours."""

import importlib.util
import json
import os

import numpy as np
from safetensors.numpy import load_file

from dmc_jax.model import llama
from dmc_jax.weights.hf_io import load_hf_dir, save_hf_dir

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _fixture_module():
    spec = importlib.util.spec_from_file_location("make_tiny_export", os.path.join(FIXTURES, "make_tiny_export.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_exporter_still_writes_the_checkpoint_transformers_read(tmp_path):
    cfg, params = _fixture_module().tiny_llama2()
    save_hf_dir(str(tmp_path / "out"), cfg, params)
    committed = os.path.join(FIXTURES, "tiny_llama2")
    assert json.load(open(tmp_path / "out" / "config.json")) == json.load(open(os.path.join(committed, "config.json")))
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = load_file(os.path.join(committed, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:  # the parameters are drawn by jax.random, whose transcendental functions may differ in the
        # last bit between compiler settings (the tests compile without LLVM optimizations: conftest.py); an
        # exporter change (a transpose, a permutation, a dtype) moves values far more than 1e-6
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_transformers_logits_on_our_export_match_ours():
    cfg, params = load_hf_dir(os.path.join(FIXTURES, "tiny_llama2"))
    ids = np.load(os.path.join(FIXTURES, "tiny_llama2_inputs.npz"))["input_ids"]
    hf = np.load(os.path.join(FIXTURES, "tiny_llama2_hf_logits.npz"))
    ours = np.asarray(llama.forward(params, ids, cfg))
    assert np.abs(ours - hf["logits"]).max() < 1e-4
