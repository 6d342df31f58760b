"""Our Hugging Face exporter writes a checkpoint that transformers loads with the same logits as ours."""

import importlib.util
import json
import os

import jax
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
    """Our loader reads the committed checkpoint (the next test: with transformers' logits); our exporter must write
    back exactly the tensors and config transformers read. Exact: no random draw is repeated here, so no machine's
    floating point can move a value (re-drawing the parameters with jax.random differed by 2e-6 on a CI machine)."""
    committed = os.path.join(FIXTURES, "tiny_llama2")
    cfg, params = load_hf_dir(committed)
    save_hf_dir(str(tmp_path / "out"), cfg, params)
    assert json.load(open(tmp_path / "out" / "config.json")) == json.load(open(os.path.join(committed, "config.json")))
    ours = load_file(str(tmp_path / "out" / "model.safetensors"))
    theirs = load_file(os.path.join(committed, "model.safetensors"))
    assert sorted(ours) == sorted(theirs)
    for name in ours:  # a transpose, a q/k permutation, a dtype or a swapped tensor changes bytes
        assert ours[name].dtype == theirs[name].dtype and ours[name].shape == theirs[name].shape, name
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)


def test_the_fixture_script_still_describes_the_committed_checkpoint():
    """tests/fixtures/make_tiny_export.py (which wrote the fixture) still draws these parameters: to the precision a
    machine's jax.random gives (its transcendental functions differ in low bits between CPUs and compiler settings)."""
    cfg, params = _fixture_module().tiny_llama2()
    cfg_c, params_c = load_hf_dir(os.path.join(FIXTURES, "tiny_llama2"))
    assert cfg == cfg_c
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(params_c)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_transformers_logits_on_our_export_match_ours():
    cfg, params = load_hf_dir(os.path.join(FIXTURES, "tiny_llama2"))
    ids = np.load(os.path.join(FIXTURES, "tiny_llama2_inputs.npz"))["input_ids"]
    hf = np.load(os.path.join(FIXTURES, "tiny_llama2_hf_logits.npz"))
    ours = np.asarray(llama.forward(params, ids, cfg))
    assert np.abs(ours - hf["logits"]).max() < 1e-4
