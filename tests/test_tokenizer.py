"""Tokenizers: SmolLM2's GGUF tokenizer against transformers' ids, HF tokenizer.json dirs, SentencePiece."""

import gzip
import io
import json
import os

import gguf
import pytest
import sentencepiece as spm

from dmc_jax.errors import UserError
from dmc_jax.tokenizer.gguf_tokenizer import tokenizer_from_gguf
from dmc_jax.tokenizer.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from dmc_jax.tokenizer.sp_tokenizer import load_sp_tokenizer
from dmc_jax.weights.load import load_tokenizer
from tests.shared_corpus import corpus_file

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE = os.path.join(HERE, "fixtures", "smollm2_tokenizer_reference.json")
CORPUS_FILES = ("python3.11-doc", "linux-doc-6.1", "perl-doc")


def corpus_paragraphs(skip_chars=0, chars=120_000, per_file=120):
    """The first per_file paragraphs after skip_chars characters of each corpus file."""
    out = []
    for name in CORPUS_FILES:
        with gzip.open(corpus_file(f"{name}.txt.gz"), "rt", encoding="utf-8") as f:
            f.read(skip_chars)
            text = f.read(chars)
        out += [p for p in text.split("\n\n")[1:-1] if p.strip()][:per_file]
    return out


@pytest.fixture(scope="module")
def smol():
    return load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def paragraphs():
    return corpus_paragraphs()


# ---------------------------------------------------------------- SmolLM2 (GGUF, byte-level BPE)

def test_smollm2_matches_transformers_reference(smol):
    ref = json.load(open(REFERENCE, encoding="utf-8"))
    assert (smol.vocab_size, smol.bos_id, smol.eos_id) == (ref["vocab_size"], ref["bos_token_id"],
                                                           ref["eos_token_id"])
    specials = set(ref["special_tokens"].values())
    for case in ref["cases"]:
        assert smol.encode(case["text"]) == case["ids"], case["text"]
        if case["decode_roundtrip"] and not any(s in case["text"] for s in specials):  # decode drops specials
            assert smol.decode(case["ids"]) == case["text"]
    for i, token in ref["special_tokens"].items():
        assert smol.encode(token) == [int(i)]
    rendered = smol.apply_chat_template(ref["chat_messages"], ref["chat_add_generation_prompt"])
    assert rendered == ref["chat_rendered"]
    assert smol.encode(rendered) == ref["chat_ids"]


def test_smollm2_round_trips_corpus_text(smol, paragraphs):
    assert len(paragraphs) > 300
    n_chars = n_tokens = 0
    for p in paragraphs:
        ids = smol.encode(p)
        assert smol.decode(ids) == p
        n_chars, n_tokens = n_chars + len(p), n_tokens + len(ids)
    assert 3.0 < n_chars / n_tokens < 6.0  # English prose: ~4 characters per token


def test_smollm2_splits_digits_individually(smol):
    ids = smol.encode("In 2024 it cost 31415 dollars")
    digits = [smol.decode([i]) for i in ids if smol.decode([i]).strip().isdigit()]
    assert digits == list("202431415")
    assert smol.encode("1234567890") == [smol.encode(d)[0] for d in "1234567890"]


def test_smollm2_special_tokens_and_stops(smol):
    assert smol.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]
    assert smol.decode([1, 4093, 198, 6004, 2, 0]) == "user\nhi"
    assert smol.stop_ids == (2,)
    assert smol.encode("hello", add_bos=True)[0] == 1
    with pytest.raises(UserError, match="token id 49152 is outside"):
        smol.decode([5, 49152])


def test_smollm2_chat_template(smol):
    with_system = smol.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hi"},
                                            {"role": "assistant", "content": "Hello!"}], add_generation_prompt=False)
    assert with_system == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\nHello!<|im_end|>\n")
    default = smol.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert default.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert default.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    for bad in ("just a string", [{"role": "user"}], [{"role": "user", "content": 3}]):
        with pytest.raises(UserError, match="chat message"):
            smol.apply_chat_template(bad)


# ---------------------------------------------------------------- Hugging Face tokenizer.json directories

def test_hf_dir_tokenizer_equals_gguf_tokenizer(tmp_path, smol, paragraphs):
    for name, content in smol.to_files().items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    tok = load_tokenizer(str(tmp_path))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids) == (49152, 1, 2, (2,))
    for p in paragraphs[::5] + ["<|im_start|>user\n12 apples<|im_end|>"]:
        assert tok.encode(p) == smol.encode(p)
    messages = [{"role": "user", "content": "Hi"}]
    assert tok.apply_chat_template(messages) == smol.apply_chat_template(messages)


def test_hf_dir_tokenizer_config_variants(tmp_path, smol):
    (tmp_path / "tokenizer.json").write_text(smol.tok.to_str(), encoding="utf-8")
    config = {"bos_token": {"content": "<|im_start|>"}, "eos_token": {"content": "<|endoftext|>"},
              "chat_template": [{"name": "tool_use", "template": "TOOLS"}, {"name": "default", "template": "D"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = load_hf_tokenizer(str(tmp_path))
    assert (tok.bos_id, tok.eos_id, tok.stop_ids) == (1, 0, (0, 2))
    assert tok.apply_chat_template([]) == "D"
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_hf_tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>x"


def test_llama3_style_stop_ids():
    from tokenizers import AddedToken, Tokenizer, models

    tok = Tokenizer(models.BPE({"a": 0, "<|begin_of_text|>": 1, "<|end_of_text|>": 2, "<|eot_id|>": 3}, []))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>")])
    t = HFTokenizer(tok, "<|begin_of_text|>", "<|end_of_text|>")
    assert (t.bos_id, t.eos_id, t.stop_ids) == (1, 2, (2, 3))
    with pytest.raises(UserError, match="no chat template"):
        t.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(UserError, match="'<missing>' is not in the vocabulary"):
        HFTokenizer(tok, "<missing>", None)


def test_hf_dir_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load_hf_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        load_hf_tokenizer(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither tokenizer.json nor tokenizer.model"):
        load_tokenizer(str(tmp_path / "empty"))


# ---------------------------------------------------------------- SentencePiece (Llama 2 style)

@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    """A tiny Llama-2-like SentencePiece BPE model trained on corpus text (byte fallback, bos=1, eos=2)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus_paragraphs(chars=200_000, per_file=300)), model_writer=model,
        vocab_size=600, model_type="bpe", byte_fallback=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=["<extra>"], max_sentence_length=100_000, num_threads=1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return str(path)


def _held_out():
    return corpus_paragraphs(skip_chars=300_000, chars=100_000, per_file=80) + [
        "  two  spaces   three", "    indented\n\tcode", "emoji 🐍 and 東京", "", " ", "trailing  "]


def test_sp_tokenizer_matches_sentencepiece(sp_model):
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = load_sp_tokenizer(sp_model)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.stop_ids) == (600, 1, 2, (2,))
    for p in _held_out():
        assert tok.encode(p) == sp.encode(p)
        assert tok.decode(tok.encode(p)) == p
    assert tok.encode("hi", add_bos=True) == [1] + sp.encode("hi")
    assert tok.encode("<s>hi</s>") == [1] + sp.encode("hi") + [2]
    assert tok.decode([1] + sp.encode("hi") + [2]) == "hi"


def test_sp_directory_with_chat_template(sp_model, tmp_path):
    os.symlink(sp_model, tmp_path / "tokenizer.model")
    template = "{% for m in messages %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]) == "<s>[INST] Hi [/INST]"


def _sp_gguf(sp_model, path):
    """A GGUF holding the SentencePiece vocabulary the way llama.cpp stores Llama 2's ('llama' model)."""
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    n = sp.get_piece_size()

    def kind(i):
        return (2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i)
                else 4 if sp.id_to_piece(i) == "<extra>" else 1)

    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types([kind(i) for i in range(n)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_space_prefix(True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sp


def test_gguf_sentencepiece_tokenizer_matches_sentencepiece(sp_model, tmp_path):
    sp = _sp_gguf(sp_model, tmp_path / "sp.gguf")
    tok = load_tokenizer(str(tmp_path / "sp.gguf"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (600, 1, 2)
    for p in _held_out():
        assert tok.encode(p) == sp.encode(p), p
        assert tok.decode(tok.encode(p)) == p
    # like llama.cpp and transformers' legacy Llama tokenizer: text after a special token gets the space prefix
    assert tok.encode("<s>hi") == [1] + sp.encode("hi")


def test_sp_and_gguf_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_sp_tokenizer(str(tmp_path / "tokenizer.model"))
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(UserError, match="is not a SentencePiece model"):
        load_sp_tokenizer(str(tmp_path / "tokenizer.model"))
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.merges": []}
    with pytest.raises(UserError, match="pre-tokenizer 'qwen2' is not supported"):
        tokenizer_from_gguf(dict(base, **{"tokenizer.ggml.pre": "qwen2"}))
    with pytest.raises(UserError, match="tokenizer model 'bert' is not supported"):
        tokenizer_from_gguf(dict(base, **{"tokenizer.ggml.model": "bert"}))
    with pytest.raises(UserError, match="carries no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})
    with pytest.raises(UserError, match="needs tokenizer.ggml.scores"):
        tokenizer_from_gguf(dict(base, **{"tokenizer.ggml.model": "llama"}))
    with pytest.raises(UserError, match="malformed BPE merge"):
        tokenizer_from_gguf(dict(base, **{"tokenizer.ggml.merges": ["abc"]}))
