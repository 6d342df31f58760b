"""The model's entry points compiled once per shape for the tests (not a test module).

Called eagerly, every `lax.scan` over the layers is traced and compiled anew on each call (a few seconds each on
CPU); tests that call the model many times with the same shapes use these jitted versions instead. Users go
through inference/generate.py, which jits its stages itself.
"""

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.model import llama

forward_aux = jax.jit(llama.forward_aux, static_argnames=("cfg", "attention"))
forward = jax.jit(llama.forward, static_argnames=("cfg",))
prefill = jax.jit(llama.prefill, static_argnames=("method", "cfg"))
decode_step = jax.jit(llama.decode_step, static_argnames=("method", "cfg"))


def prefill_then_decode(params, cfg, method, tokens_BT, prompt: int):
    """(logits [B, T - prompt + 1, V], the cache state) of `method`: the logits after the first `prompt` tokens
    (prefill), then after each later token (decode steps)."""
    B, T = tokens_BT.shape
    state = method.init(cfg, B, T)
    logits_BV, state = prefill(params, tokens_BT[:, :prompt], jnp.full((B,), prompt), state, method=method, cfg=cfg)
    out = [logits_BV]
    for t in range(prompt, T):
        logits_BV, state = decode_step(params, tokens_BT[:, t], jnp.full((B,), t), state, method=method, cfg=cfg)
        out.append(logits_BV)
    return np.stack(out, axis=1), state
