"""Task `generate`: text from prompts (chat template optional) through the configured cache method."""

from __future__ import annotations

import time

import jax
import ml_collections
import numpy as np

from dmc_jax.cache import model_method
from dmc_jax.errors import UserError
from dmc_jax.inference.generate import GenerateConfig, generate
from dmc_jax.inference.sampling import SamplingConfig
from dmc_jax.user_files import read_text


def prompts_from_config(g: ml_collections.ConfigDict) -> list[str]:
    if g.prompts_file:
        prompts = [line for line in read_text(g.prompts_file, "generate.prompts_file").split("\n") if line.strip()]
        if not prompts:
            raise UserError(f"generate.prompts_file {g.prompts_file} has no prompts (one per line)")
        return prompts
    if not g.prompt.strip():
        raise UserError("generate.prompt is empty; give some text, e.g. --config.generate.prompt='Hello'")
    return [g.prompt]


def run(config: ml_collections.ConfigDict, model) -> dict:
    """Generates from config.generate's prompts; returns texts, token counts, speed and cache stats."""
    g, tok = config.generate, model.tokenizer
    texts = prompts_from_config(g)
    if g.chat:
        texts = [tok.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    prompts = [tok.encode(t) for t in texts]
    gen = GenerateConfig(max_new_tokens=g.max_new_tokens,
                         sampling=SamplingConfig(g.temperature, g.top_k, g.top_p),
                         stop_ids=tuple(tok.stop_ids), pad_id=0)
    method = model_method.make(config)
    start = time.perf_counter()
    out = generate(model.params, prompts, model.cfg, method, gen, jax.random.PRNGKey(config.seed))
    seconds = time.perf_counter() - start
    stats = method.stats(out.state, out.lengths)
    samples = []
    for text, prompt, ids, done in zip(texts, prompts, out.tokens, out.finished):
        completion = tok.decode(ids)
        print(f"--- prompt ({len(prompt)} tokens)\n{text}\n--- completion ({len(ids)} tokens)\n{completion}")
        samples.append({"prompt": text, "prompt_tokens": len(prompt), "completion": completion,
                        "completion_ids": ids, "stopped": done})
    new_tokens = sum(len(s["completion_ids"]) for s in samples)
    return {"samples": samples, "cache_method": method.name, "seconds_including_compile": seconds,
            "new_tokens": new_tokens,
            "cache_bytes_allocated": int(stats["bytes_allocated"]),
            "cache_bytes_in_use": int(np.asarray(stats["bytes_in_use"]))}
