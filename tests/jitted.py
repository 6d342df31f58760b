"""The model's entry points compiled once per shape for the tests (not a test module).

Called eagerly, every `lax.scan` over the layers is traced and compiled anew on each call (a few seconds each on
CPU); tests that call the model many times with the same shapes use these jitted versions instead. Users go
through inference/generate.py, which jits its stages itself.
"""

import jax

from dmc_jax.model import llama

forward_aux = jax.jit(llama.forward_aux, static_argnames=("cfg", "attention"))
forward = jax.jit(llama.forward, static_argnames=("cfg",))
prefill = jax.jit(llama.prefill, static_argnames=("method", "cfg"))
decode_step = jax.jit(llama.decode_step, static_argnames=("method", "cfg"))
