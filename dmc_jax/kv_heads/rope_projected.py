"""Strategy A for RoPE keys: Psi from the ROTATED calibration keys, q and k projected after RoPE at run time.

score = rot(q_h) Psi_a . rot(k_G) Psi (Psi_a: the block of Psi for the query head's original KV head), which is
exact in the projected space (and equal to the original score when r = t * Dh). It cannot be folded into W_q,
W_k, so the converted model keeps the original W_q [D, H, Dh] and W_k [D, K, Dh], and every step computes the
group's t keys, rotates them and projects them (an extra A x r matmul per new KV head, and Dh x r per query head).
Values carry no RoPE and fold as in svd.py.

Where it lives: the projection sits between RoPE and the cache, which is exactly the cache protocol's seam (the
model hands methods q/k before RoPE and a rope function). So A is a cache-method wrapper, `RopeProjected`, around
any method (dense or an eviction policy): it rotates q/k with the ORIGINAL head dim's RoPE, projects them, and
hands the inner method rotated, projected q'/k' with an identity rope. The model code is untouched; the
converted params are a plain pytree (k keeps K heads, v/o have J heads of dim r). Not exportable to a Hugging
Face directory (no such architecture there); methods that must see keys before RoPE (DMC) do not compose.

Shape letters: L layers, B batch, T time, H query heads, K KV heads, J new KV heads, A = t * Dh, r new head dim,
Dh original head dim.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.cache.protocol import CacheMethod
from dmc_jax.kv_heads.svd import fold_values, query_blocks
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.layers import Rope
from dmc_jax.model.params import Params


def _identity_rope(x, positions):
    return x


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument holding arrays
class RopeProjected:
    """Rotates with the original RoPE, projects q/k onto the shared key basis, then runs `inner`."""

    inner: CacheMethod
    psi_k: np.ndarray       # [L, J, A, r]
    psi_q: np.ndarray       # [L, H, Dh, r], scaled by sqrt(r / Dh)
    rope_cfg: ModelConfig   # the original model (head dim and RoPE frequencies)

    @property
    def name(self) -> str:
        return f"{self.inner.name}+rope_projected"

    def init(self, cfg, batch, max_tokens):
        return self.inner.init(cfg, batch, max_tokens)

    def _project(self, layer, q_BTHD, k_BTKD, positions_BT):
        rope = Rope(self.rope_cfg)
        q_BTHD, k_BTKD = rope(q_BTHD, positions_BT), rope(k_BTKD, positions_BT)
        L, J, A, r = self.psi_k.shape
        B, T = k_BTKD.shape[:2]
        psi_k = jnp.asarray(self.psi_k, q_BTHD.dtype)[layer]
        psi_q = jnp.asarray(self.psi_q, q_BTHD.dtype)[layer]
        k_BTJR = jnp.einsum("btja,jar->btjr", k_BTKD.reshape(B, T, J, A), psi_k)
        q_BTHR = jnp.einsum("bthe,her->bthr", q_BTHD, psi_q)
        return q_BTHR, k_BTJR

    def prefill(self, state, layer, q_BTHD, k_BTKD, v_BTKD, lengths_B, rope):
        B, T = q_BTHD.shape[:2]
        positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        q_BTHR, k_BTJR = self._project(layer, q_BTHD, k_BTKD, positions_BT)
        return self.inner.prefill(state, layer, q_BTHR, k_BTJR, v_BTKD, lengths_B, _identity_rope)

    def decode(self, state, layer, q_BHD, k_BKD, v_BKD, positions_B, rope):
        q_B1HR, k_B1JR = self._project(layer, q_BHD[:, None], k_BKD[:, None], positions_B[:, None])
        return self.inner.decode(state, layer, q_B1HR[:, 0], k_B1JR[:, 0], v_BKD, positions_B, _identity_rope)

    def stats(self, state, tokens_B):
        return self.inner.stats(state, tokens_B)


def convert(cfg: ModelConfig, params: Params, psi_LJAR: np.ndarray, phi_LJAR: np.ndarray):
    """(cfg with J KV heads of dim r, params, wrap) where wrap(method) -> RopeProjected(method, ...)."""
    L, J, A, r = psi_LJAR.shape
    layers = dict(params["layers"])
    dtype = np.asarray(layers["v"]).dtype
    layers.update({name: x.astype(dtype) for name, x in fold_values(cfg, layers, phi_LJAR).items()})
    psi_q = (query_blocks(cfg, psi_LJAR) * np.sqrt(r / cfg.head_dim)).astype(np.float32)
    psi_k = psi_LJAR.astype(np.float32)
    rope_cfg = cfg

    def wrap(method: CacheMethod) -> RopeProjected:
        return RopeProjected(method, psi_k, psi_q, rope_cfg)

    return cfg.replace(num_kv_heads=J, head_dim=r), {**params, "layers": layers}, wrap
