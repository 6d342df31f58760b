"""Every method serves a changing batch through the protocol's row operations: a finished row is freed, a new
prompt is prefilled into it (take_rows / put_rows) while the other row keeps decoding, and neither row's logits
depend on the other's; the dense cache also continues rows in chunks (prefill with a start position)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dmc_jax.cache import registry
from dmc_jax.errors import UserError
from dmc_jax.model import llama
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params
from tests import jitted


def _model():
    cfg = tiny_config(num_kv_heads=2)
    params = init_params(cfg, jax.random.PRNGKey(0))
    # DMC reads its decisions from the last key channel: random signs give a mix of appends and merges.
    params["layers"]["k"] = params["layers"]["k"].at[..., -1].multiply(2.0)
    return cfg, llama.unstack_layers(params)


def _method(name):
    cache = ml_collections.ConfigDict({"method": name, "budget": 10, "snapkv": {"window": 4},
                                       "corm": {"window": 2, "recent": 4}, "corm_capped": {"window": 2, "recent": 4}})
    hparams, trained = None, registry.get(name).trained
    if trained is not None:
        hparams = registry.trained_defaults(trained.section)
        if trained.section == "dmc":  # offset 0: a mix of appends and merges on the random model
            hparams.update(dict(decision_offset=0.0, window=3))
        if trained.section == "dms":  # a short window and offset 0: evictions within the test's 32 tokens
            hparams.update(dict(decision_offset=0.0, window=3))
    return registry.build(name, cache, hparams)


def _pad(tokens_T, T):
    return jnp.zeros((1, T), jnp.int32).at[0, :len(tokens_T)].set(tokens_T)


def _run_alone(cfg, params, method, tokens_T, length, steps, max_tokens):
    """Logits of one sequence alone: prefill `length` tokens, then decode `steps` teacher-forced ones."""
    state = method.init(cfg, 1, max_tokens)
    logits, state = jitted.prefill(params, _pad(tokens_T[:length], max_tokens), jnp.array([length]), state,
                                   method=method, cfg=cfg)
    out = [logits[0]]
    for i in range(steps):
        logits, state = jitted.decode_step(params, tokens_T[length + i][None], jnp.array([length + i]), state,
                                           method=method, cfg=cfg)
        out.append(logits[0])
    return np.stack(out)


@pytest.mark.parametrize("name", registry.names())  # every built-in method
def test_a_freed_row_takes_a_new_prompt_and_no_row_depends_on_the_other(name):
    cfg, params = _model()
    method = _method(name)
    T, steps = 32, 4
    seqs = jax.random.randint(jax.random.PRNGKey(1), (3, T), 1, cfg.vocab_size)
    lengths = (12, 9, 11)
    state = method.init(cfg, 2, T)
    prompts = jnp.concatenate([_pad(seqs[0, :12], T), _pad(seqs[1, :9], T)])
    _, state = jitted.prefill(params, prompts, jnp.array(lengths[:2]), state, method=method, cfg=cfg)
    pos = jnp.array(lengths[:2])
    for _ in range(steps):
        _, state = jitted.decode_step(params, seqs[jnp.arange(2), pos], pos, state, method=method, cfg=cfg)
        pos = pos + 1
    # Row 0 is finished: freed, then a new prompt (sequence 2) is prefilled into it.
    state = jax.jit(method.free_rows)(state, jnp.array([True, False]))
    rows_R = jnp.array([0])
    sub = method.take_rows(state, rows_R)
    new_first, sub = jitted.prefill(params, _pad(seqs[2, :11], T), jnp.array([11]), sub, method=method, cfg=cfg)
    state = method.put_rows(state, sub, rows_R)
    got_new, got_old = [new_first[0]], []
    pos = jnp.array([11, int(pos[1])])
    for _ in range(steps):
        logits, state = jitted.decode_step(params, jnp.stack([seqs[2, pos[0]], seqs[1, pos[1]]]), pos, state,
                                           method=method, cfg=cfg)
        got_new.append(logits[0])
        got_old.append(logits[1])
        pos = pos + 1
    alone_new = _run_alone(cfg, params, method, seqs[2], 11, steps, T)
    alone_old = _run_alone(cfg, params, method, seqs[1], 9, 2 * steps, T)[steps + 1:]
    np.testing.assert_allclose(np.stack(got_new), alone_new, atol=2e-5)
    np.testing.assert_allclose(np.stack(got_old), alone_old, atol=2e-5)
    if name == "dmc_paged":  # the freed row's pages went back to the pool and were handed out again
        assert int(state["top"]) < state["pool_k"].shape[0]


def test_dense_prefill_in_chunks_equals_one_prefill():
    cfg, params = _model()
    method = registry.build("dense", ml_collections.ConfigDict())
    T = 24
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, T), 1, cfg.vocab_size)
    lengths = jnp.array([20, 13])
    whole, state_w = jitted.prefill(params, tokens * (jnp.arange(T) < lengths[:, None]), lengths,
                                    method.init(cfg, 2, T), method=method, cfg=cfg)
    # Two chunks: the first 8 tokens of each row, then the rest (ragged: 12 and 5 more) from position 8.
    state = method.init(cfg, 2, T)
    _, state = jitted.prefill(params, tokens[:, :8], jnp.array([8, 8]), state, method=method, cfg=cfg)
    rest = lengths - 8
    chunk = jnp.where(jnp.arange(16)[None] < rest[:, None], tokens[:, 8:24], 0)
    logits, state = jitted.prefill(params, chunk, rest, state, method=method, cfg=cfg, starts_B=jnp.array([8, 8]))
    np.testing.assert_allclose(logits, whole, atol=2e-5)
    for b, n in enumerate(np.asarray(lengths)):
        np.testing.assert_allclose(state["k"][:, b, :, :n], state_w["k"][:, b, :, :n], atol=2e-6)
    # and decoding goes on from there exactly as after the single prefill
    step = lambda s: jitted.decode_step(params, tokens[:, 0], lengths, s, method=method, cfg=cfg)[0]
    np.testing.assert_allclose(step(state), step(state_w), atol=2e-5)


def test_a_method_without_prefill_start_refuses_it_in_one_line():
    cfg, params = _model()
    method = _method("h2o")
    with pytest.raises(UserError, match="cannot continue rows already in its cache"):
        jitted.prefill(params, jnp.ones((1, 4), jnp.int32), jnp.array([4]), method.init(cfg, 1, 8), method=method,
                       cfg=cfg, starts_B=jnp.array([2]))
