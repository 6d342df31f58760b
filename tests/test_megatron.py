"""NVIDIA's Megatron-LM DMC checkpoints: the torch-free, code-free reader, the parameter mapping and the conversion.

Fixtures (tests/fixtures/README_megatron.md, made by make_megatron_dmc.py in the torch environment): tiny
checkpoints with the released layout (MHA like Llama-2-7B-DMC-8x, and a GQA variant) and the fp32 logits and hard
DMC decisions of a PyTorch transcription of the reference's eval-mode forward.
"""

import os
import pickle
import shutil
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache.dmc_paged import DMCPagedCache
from dmc_jax.dmc.attention import DMCAttention
from dmc_jax.cache.model_method import read as read_method
from dmc_jax.dmc.objective import dmc_config
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.params import cast, flatten
from dmc_jax.weights import megatron, torch_zip
from dmc_jax.weights.safe_unpickle import Namespace, Opaque

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
REPO = os.path.dirname(HERE)
REF = np.load(os.path.join(FIX, "megatron_dmc_reference.npz"))


# ------------------------------------------------------------------------------------------------ the reader
def test_reader_rebuilds_every_dtype_and_view_like_torch():
    obj = torch_zip.load(os.path.join(FIX, "torch_zip_dtypes.pt"))
    want = np.load(os.path.join(FIX, "torch_zip_dtypes.npz"))
    assert set(obj["model"]) == set(want.files)
    for name, w in obj["model"].items():
        assert w.shape == want[name].shape, name
        np.testing.assert_array_equal(np.asarray(w).astype(want[name].dtype), want[name], err_msg=name)
        assert not w.flags.writeable  # views of the read-only memory map
    assert str(obj["model"]["bfloat16"].dtype) == "bfloat16" and obj["model"]["float16"].dtype == np.float16
    assert isinstance(obj["args"], Namespace) and obj["args"].params_dtype == "bfloat16"
    assert obj["args"].size == (2, 3) and obj["bytes"] == b"\x00\xff" and obj["set"] == {1, 2}
    assert isinstance(obj["extra"], Opaque) and isinstance(obj["np_rng_state"][1], Opaque)


def _torch_zip(path, payload: bytes, storages=None):
    """A zip shaped like torch.save's, holding `payload` as the pickle (and raw storages)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
    return path


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _call(module, name, arg: str):
    """GLOBAL module.name, then REDUCE with one string argument: what pickling a call looks like."""
    return _global(module, name) + b"(" + pickle.dumps(arg, protocol=0)[:-1].rstrip(b"p0\n") + b"tR."


@pytest.mark.parametrize("module,name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                         ("builtins", "getattr"), ("subprocess", "Popen"), ("this", "s"),
                                         ("torch", "load"), ("numpy", "load"), ("torch._utils", "_rebuild_qtensor")])
def test_reader_refuses_any_global_outside_the_allow_list_without_importing_it(tmp_path, module, name):
    marker = tmp_path / "ran"
    path = _torch_zip(tmp_path / "evil.pt", _call(module, name, f"touch {marker}"))
    was_imported = module in sys.modules
    with pytest.raises(UserError, match=f"{module}.{name}.*not on the allow-list") as e:
        torch_zip.load(str(path))
    assert "\n" not in str(e.value)
    assert not marker.exists()
    assert was_imported or module not in sys.modules  # find_class never imports ('this' would print the Zen)


def test_reader_refuses_extension_opcodes_and_attribute_writes_on_classes(tmp_path):
    ext = _torch_zip(tmp_path / "ext.pt", b"\x80\x02\x82\x01.")  # EXT1 code 1
    with pytest.raises(UserError, match="extension registry"):
        torch_zip.load(str(ext))
    # BUILD on an allowed class (not an instance) would rewrite our stand-in: refused
    build = _torch_zip(tmp_path / "build.pt", _global("collections", "OrderedDict") + b"(dS'x'\nI1\nsb.")
    with pytest.raises(UserError, match="sets attributes"):
        torch_zip.load(str(build))


def _tensor_pickle(size, stride, offset=0, tail=b"."):
    """Hand-written protocol-2 pickle of _rebuild_tensor_v2(<4-float storage '0'>, offset, size, stride, ...)."""
    return (b"\x80\x02" + _global("torch._utils", "_rebuild_tensor_v2") + b"(" +
            b"(X\x07\x00\x00\x00storage" + _global("torch", "FloatStorage") +
            b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ" +  # persistent id ('storage', cls, '0', 'cpu', 4)
            b"K" + bytes([offset]) + pickle.dumps(tuple(size), 2)[2:-1] + pickle.dumps(tuple(stride), 2)[2:-1] +
            b"\x89}tR" + tail)


def test_reader_refuses_tensors_outside_their_storage_and_broken_files(tmp_path):
    payload = _tensor_pickle
    data = np.arange(4, dtype=np.float32).tobytes()
    ok = _torch_zip(tmp_path / "ok.pt", payload((2, 2), (2, 1)), {"0": data})
    np.testing.assert_array_equal(torch_zip.load(str(ok)), [[0, 1], [2, 3]])
    for size, stride, offset in (((3, 2), (2, 1), 0), ((2, 2), (2, 1), 1), ((5,), (1,), 0), ((2,), (3,), 2)):
        bad = _torch_zip(tmp_path / "bad.pt", payload(size, stride, offset), {"0": data})
        with pytest.raises(UserError, match="reaching element|corrupt"):
            torch_zip.load(str(bad))
    # BUILD on a tensor would hand numpy's __setstate__ a new buffer: refused
    swap = _torch_zip(tmp_path / "swap.pt", _tensor_pickle((2, 2), (2, 1), tail=b"}b."), {"0": data})
    with pytest.raises(UserError, match="sets attributes"):
        torch_zip.load(str(swap))
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserError, match="not a readable zip"):
        torch_zip.load(str(tmp_path / "junk.pt"))
    (tmp_path / "legacy.pt").write_bytes(pickle.dumps({"a": 1}, protocol=2))
    with pytest.raises(UserError, match="pre-1.6"):
        torch_zip.load(str(tmp_path / "legacy.pt"))


def test_cli_refuses_a_code_running_checkpoint_with_exit_2_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    (ckpt / "mp_rank_00").mkdir(parents=True)
    (ckpt / "latest_checkpointed_iteration.txt").write_text("release")
    _torch_zip(ckpt / "mp_rank_00" / "model_optim_rng.pt", _call("os", "system", f"touch {marker}"))
    proc = subprocess.run([sys.executable, "-m", "dmc_jax.main", "--config", "configs/megatron_dmc.py",
                           f"--config.convert.source={ckpt}", f"--config.output_dir={tmp_path / 'run'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "os.system" in lines[0] and "allow-list" in lines[0], proc.stderr
    assert not marker.exists()
    assert not (tmp_path / "run" / "model").exists()


# ------------------------------------------------------------------------------------------------ the mapping
@pytest.mark.parametrize("variant", ["mha", "gqa"])
def test_converted_checkpoint_matches_the_reference_forward(variant):
    cfg, params, args = megatron.load_params(os.path.join(FIX, f"megatron_dmc_{variant}"))
    assert cfg.param_dtype == "bfloat16" and not cfg.tie_embeddings
    assert (cfg.num_heads, cfg.num_kv_heads) == ((4, 4) if variant == "mha" else (4, 2))
    section = megatron.dmc_section(args)
    assert (section.window, section.decision_offset, section.target_cr, section.importance_eps) == (12, 5.0, 8.0,
                                                                                                      2.0 ** -7)
    dmc = dmc_config(section).replace(mode="hard")
    cfg32 = cfg.replace(param_dtype="float32")
    logits, aux = jax.jit(lambda p, t: llama.forward_aux(p, t, cfg32, attention=DMCAttention(dmc)))(
        cast(params, jnp.float32), jnp.asarray(REF["input_ids"]))
    np.testing.assert_allclose(np.asarray(logits), REF[f"{variant}_logits"], atol=1e-4, rtol=0)
    decisions = np.asarray(aux["alpha_BTK"]) > 0.5
    np.testing.assert_array_equal(decisions, REF[f"{variant}_decisions"] > 0)
    assert 0.1 < decisions.mean() < 0.3  # the fixture does merge: the comparison covers accumulation and masking


def test_converted_checkpoint_decodes_through_the_dmc_cache_like_the_reference():
    """Prefill 24 tokens into the paged DMC cache, then decode 16 one by one: every logit equals the reference's
    parallel forward at that position (the reference's own decode is CUDA/Triton-only)."""
    cfg, params, args = megatron.load_params(os.path.join(FIX, "megatron_dmc_gqa"))
    cfg = cfg.replace(param_dtype="float32", max_seq_len=64)
    params = llama.unstack_layers(cast(params, jnp.float32))
    method = DMCPagedCache(dmc_config(megatron.dmc_section(args)), page_size=4)
    ids = jnp.asarray(REF["input_ids"])
    B, T, P = ids.shape[0], ids.shape[1], 24
    state = method.init(cfg, B, T)
    prefill = jax.jit(llama.prefill, static_argnames=("method", "cfg"))
    decode = jax.jit(llama.decode_step, static_argnames=("method", "cfg"))
    logits, state = prefill(params, ids[:, :P], jnp.full((B,), P), state, method=method, cfg=cfg)
    got = [logits]
    for t in range(P, T - 1):
        logits, state = decode(params, ids[:, t], jnp.full((B,), t), state, method=method, cfg=cfg)
        got.append(logits)
    np.testing.assert_allclose(np.stack([np.asarray(g) for g in got], 1), REF["gqa_logits"][:, P - 1:T - 1],
                               atol=1e-4, rtol=0)


def test_checkpoint_layouts_are_found_and_sharded_ones_refused(tmp_path):
    src = os.path.join(FIX, "megatron_dmc_mha", "mp_rank_00", "model_optim_rng.pt")
    assert megatron.find_checkpoint(os.path.join(FIX, "megatron_dmc_mha")) == os.path.join(
        FIX, "megatron_dmc_mha", "mp_rank_00", "model_optim_rng.pt")
    assert megatron.find_checkpoint(src) == src
    for tracker, sub in (("1000", "iter_0001000"), ("release", "release")):
        root = tmp_path / sub.split("_")[0]
        (root / sub / "mp_rank_00").mkdir(parents=True)
        (root / "latest_checkpointed_iteration.txt").write_text(tracker + "\n")
        shutil.copy(src, root / sub / "mp_rank_00")
        assert megatron.find_checkpoint(str(root)) == str(root / sub / "mp_rank_00" / "model_optim_rng.pt")
    (tmp_path / "tp" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "tp" / "mp_rank_01").mkdir()
    with pytest.raises(UserError, match="tensor- or pipeline-parallel"):
        megatron.find_checkpoint(str(tmp_path / "tp"))
    with pytest.raises(UserError, match="not a Megatron checkpoint"):
        megatron.find_checkpoint(str(tmp_path))


def test_unsupported_architectures_and_foreign_tensors_are_named():
    obj = torch_zip.load(os.path.join(FIX, "megatron_dmc_mha", "mp_rank_00", "model_optim_rng.pt"))
    args = obj["args"]
    for field, value, message in (("rotary_interleaved", True, "non-interleaved"), ("rotary_percent", 0.5, "whole"),
                                  ("swiglu", False, "SwiGLU"), ("normalization", "LayerNorm", "RMSNorm"),
                                  ("add_bias_linear", True, "bias")):
        bad = Namespace(**{**vars(args), field: value})
        with pytest.raises(UserError, match=message):
            megatron.config_from_args(bad, 256, "bfloat16")
    cfg = megatron.config_from_args(args, 256, "bfloat16")
    with pytest.raises(UserError, match="decoder.layers.0.self_attention.q_layernorm.weight"):
        megatron.hf_tensors(cfg, {"decoder.layers.0.self_attention.q_layernorm.weight": np.ones(16)}, "ckpt")
    with pytest.raises(UserError, match="legacy"):
        megatron.hf_tensors(cfg, {"language_model.embedding.word_embeddings.weight": np.ones((2, 2))}, "ckpt")
    assert megatron.dmc_section(Namespace(num_layers=2)) is None  # a plain (non-DMC) Megatron model


def test_convert_task_writes_a_model_directory_every_task_loads(tmp_path):
    from dmc_jax.main import run
    from dmc_jax.weights.load import load_model

    out = tmp_path / "model"
    run(["--config", os.path.join(REPO, "configs", "megatron_dmc.py"),
         f"--config.convert.source={os.path.join(FIX, 'megatron_dmc_gqa')}", f"--config.convert.output={out}",
         "--config.convert.target_cr=4", f"--config.output_dir={tmp_path / 'run'}"])
    loaded = load_model(str(out), require_tokenizer=False)
    _, params, _ = megatron.load_params(os.path.join(FIX, "megatron_dmc_gqa"))
    assert loaded.cfg.param_dtype == "bfloat16" and loaded.cfg.num_kv_heads == 2
    want = flatten(params)
    for path, w in flatten(loaded.params).items():
        np.testing.assert_array_equal(np.asarray(w), np.asarray(want[path]), err_msg=path)
    saved = read_method(str(out)).hparams
    assert (saved.window, saved.target_cr, saved.decision_channel, saved.zero_after_rope) == (12, 4.0, -1, True)


def test_reader_turns_every_corrupted_pickle_into_a_user_error_or_a_value(tmp_path):
    """200 random byte flips / truncations of a real checkpoint pickle: each loads or fails with UserError, never
    another exception (and, with find_class never importing, never runs anything)."""
    src = os.path.join(FIX, "torch_zip_dtypes.pt")
    with zipfile.ZipFile(src) as z:
        entries = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in entries if n.endswith("/data.pkl"))
    rng = np.random.default_rng(0)
    outcomes = {"ok": 0, "refused": 0}
    for i in range(200):
        data = bytearray(entries[pkl])
        if i % 4 == 0:
            data = data[: rng.integers(1, len(data))]
        for pos in rng.integers(0, len(data), size=rng.integers(1, 4)):
            data[pos] = rng.integers(0, 256)
        path = tmp_path / f"f{i}.pt"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
            for n, b in entries.items():
                z.writestr(n, bytes(data) if n == pkl else b)
        try:
            torch_zip.load(str(path))
            outcomes["ok"] += 1
        except UserError as e:
            assert "\n" not in str(e)
            outcomes["refused"] += 1
    assert outcomes["refused"] > 50, outcomes


def test_a_megatron_directory_as_model_source_says_how_to_convert_it():
    from dmc_jax.weights.load import load_model

    with pytest.raises(UserError, match="Megatron-LM checkpoint; convert it once"):
        load_model(os.path.join(FIX, "megatron_dmc_mha"))
