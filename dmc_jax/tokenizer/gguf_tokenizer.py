"""Builds a `tokenizers.Tokenizer` from the tokenizer arrays of a GGUF file (tokenizer.ggml.*).

Two llama.cpp tokenizer models are supported:
  - "gpt2": byte-level BPE from tokens + merges; the pre-tokenizer named by tokenizer.ggml.pre
    ("smollm": single digits, then byte-level; "gpt-2"; "llama-bpe", Llama 3's split regex).
  - "llama": SentencePiece BPE (Llama 2) from tokens + scores, as transformers converts it: merges are
    the splits of each piece into two pieces, ranked by the merged piece's score; byte fallback tokens.
Token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
"""

from __future__ import annotations

from typing import Any, Dict

from dmc_jax.errors import UserError
from dmc_jax.tokenizer.hf_tokenizer import HFTokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPIECE_SPACE = "\u2581"


def _pre_tokenizer(pre: str, name: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre == "gpt-2":
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in ("llama-bpe", "llama3"):
        return pt.Sequence([pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    raise UserError(f"{name}: GGUF pre-tokenizer {pre!r} is not supported (smollm, gpt-2, llama-bpe); load "
                    f"the model from its Hugging Face directory with tokenizer.json instead")


def _byte_level_bpe(meta: Dict[str, Any], tokens: list, name: str):
    from tokenizers import Tokenizer, decoders, models

    merges = []
    for m in meta.get("tokenizer.ggml.merges") or []:
        parts = m.split(" ")
        if len(parts) != 2:
            raise UserError(f"{name}: malformed BPE merge {m!r} in tokenizer.ggml.merges; the file is corrupt")
        merges.append((parts[0], parts[1]))
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"), name)
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: Dict[str, Any], tokens: list, types: list, name: str):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise UserError(f"{name}: a 'llama' (SentencePiece) tokenizer needs tokenizer.ggml.scores for every token")
    vocab = {t: i for i, t in enumerate(tokens)}
    mergeable = {t for t, k in zip(tokens, types) if k == NORMAL}
    merges = []
    for piece, kind, score in zip(tokens, types, scores):
        if kind != NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-score, vocab[piece], vocab[left], left, right))
    merges.sort()
    unk = next((t for t, k in zip(tokens, types) if k == UNKNOWN), None)
    tok = Tokenizer(models.BPE(vocab, [(m[3], m[4]) for m in merges], unk_token=unk, fuse_unk=True,
                               byte_fallback=BYTE in types))
    spaces = [normalizers.Replace(" ", SPIECE_SPACE)]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        spaces.insert(0, normalizers.Prepend(SPIECE_SPACE))
    tok.normalizer = normalizers.Sequence(spaces)
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get("tokenizer.ggml.add_space_prefix", True):
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_special_tokens(tok, tokens: list, types: list, name: str) -> None:
    """Registers control/unknown tokens as special and user-defined ones as added tokens, at their own ids."""
    from tokenizers import AddedToken

    special = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k in (CONTROL, UNKNOWN)]
    user = [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise UserError(f"{name}: the GGUF vocabulary has duplicate or unusable tokens; load the model from its "
                        f"Hugging Face directory instead")


def tokenizer_from_gguf(meta: Dict[str, Any], name: str = "GGUF") -> HFTokenizer:
    """HFTokenizer from GGUF metadata (gguf_loader.gguf_metadata), with its bos/eos and chat template."""
    model = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if model is None or not tokens:
        raise UserError(f"{name} carries no tokenizer (tokenizer.ggml.*); use a GGUF with an embedded tokenizer")
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise UserError(f"{name}: tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length; "
                        f"the file is corrupt")
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, name)
    elif model == "llama":
        tok = _sentencepiece_bpe(meta, tokens, types, name)
    else:
        raise UserError(f"{name}: GGUF tokenizer model {model!r} is not supported (gpt2, llama); load the model "
                        f"from its Hugging Face directory instead")
    _add_special_tokens(tok, tokens, types, name)

    def token(key):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    return HFTokenizer(tok, token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"),
                       meta.get("tokenizer.chat_template"), extra_stop_ids=[meta.get("tokenizer.ggml.eot_token_id")]
                       if meta.get("tokenizer.ggml.eot_token_id") is not None else (), name=name)
