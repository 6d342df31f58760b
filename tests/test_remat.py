"""Named remat policies: every policy gives the same loss and gradients as no remat; unknown names are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dmc_jax.model import llama, remat
from dmc_jax.model.config import tiny_config
from dmc_jax.model.params import init_params

CFG = tiny_config()


def _loss_and_grads(cfg):
    params = init_params(cfg, jax.random.PRNGKey(0))
    tokens_BT = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, cfg.vocab_size)

    def loss(p):
        return jax.nn.logsumexp(llama.forward(p, tokens_BT, cfg), axis=-1).mean()

    return jax.jit(jax.value_and_grad(loss))(params)


def test_every_policy_matches_no_remat():
    ref_loss, ref_grads = _loss_and_grads(CFG.replace(remat_policy="none"))
    for name in remat.POLICIES[1:]:
        loss, grads = _loss_and_grads(CFG.replace(remat_policy=name))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(grads)):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def test_policy_names():
    assert remat.policy_name(True) == "full" and remat.policy_name(False) == "none"
    assert remat.policy_name(True, "dots") == "dots"
    f = lambda x: jnp.sin(x)
    assert remat.wrap(f, False) is f
    with pytest.raises(ValueError, match="model.remat_policy must be one of"):
        remat.wrap(f, False, "everything")
