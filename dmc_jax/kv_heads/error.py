"""How far a KV-head projection moves one layer's attention output, computed from the algebra directly.

For real activations (pre-RoPE q/k/v of a layer, from activations.layer_qkv) and bases Psi/Phi, the relative
error ||y' - y|| / ||y|| of the layer's attention output after W_o, where y is the original attention and y' the
converted one under a RoPE strategy:
    'none'  no rotation at all (the algebra SVD-a is exact for; Psi from pre-RoPE keys)
    'A'     rotate, then project q/k (Psi from rotated keys): exact at full rank
    'B'     project, then rotate in the new head space (the standard-GQA fold; Psi from pre-RoPE keys)

Shape letters: B batch, T time, H query heads, K KV heads, J new KV heads, A = t * Dh, r rank, Dh head dim, D embed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dmc_jax.kv_heads.svd import query_blocks
from dmc_jax.model.attention import causal_mask, grouped_attention
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.layers import Rope

STRATEGIES = ("none", "A", "B")


@functools.partial(jax.jit, static_argnames=("cfg", "strategy"))
def _outputs(cfg: ModelConfig, strategy: str, w_o_HED, q_BTHE, k_BTKE, v_BTKE, psi_JAR, phi_JAR, psi_q_HER,
             phi_o_HER):
    B, T = q_BTHE.shape[:2]
    J, A, r = psi_JAR.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    mask = causal_mask(positions_BT, positions_BT)
    rope = Rope(cfg) if strategy != "none" else (lambda x, p: x)
    hp = jax.lax.Precision.HIGHEST
    y_BTD = jnp.einsum("bthe,hed->btd", grouped_attention(rope(q_BTHE, positions_BT), rope(k_BTKE, positions_BT),
                                                          v_BTKE, mask), w_o_HED, precision=hp)
    pre, post = (rope, (lambda x, p: x)) if strategy == "A" else ((lambda x, p: x), Rope(cfg.replace(head_dim=r)))
    if strategy == "none":
        post = lambda x, p: x
    q_BTHE, k_BTKE = pre(q_BTHE, positions_BT), pre(k_BTKE, positions_BT)
    k_BTJR = jnp.einsum("btja,jar->btjr", k_BTKE.reshape(B, T, J, A), psi_JAR, precision=hp)
    v_BTJR = jnp.einsum("btja,jar->btjr", v_BTKE.reshape(B, T, J, A), phi_JAR, precision=hp)
    q_BTHR = jnp.einsum("bthe,her->bthr", q_BTHE, psi_q_HER, precision=hp)
    out_BTHR = grouped_attention(post(q_BTHR, positions_BT), post(k_BTJR, positions_BT), v_BTJR, mask)
    y2_BTD = jnp.einsum("bthr,her,hed->btd", out_BTHR, phi_o_HER, w_o_HED, precision=hp)
    return y_BTD, y2_BTD


def attention_output_error(cfg: ModelConfig, w_o_HED, q_BTHE, k_BTKE, v_BTKE, psi_JAR, phi_JAR,
                           strategy: str) -> float:
    """Relative error of the layer's attention output (after W_o) under the projection and RoPE strategy."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}; got {strategy!r}")
    r = psi_JAR.shape[-1]
    if strategy == "B" and r != cfg.head_dim:
        raise ValueError("strategy B rotates in the new head space: it needs rank == head_dim")
    psi_q = query_blocks(cfg, np.asarray(psi_JAR)[None])[0] * np.sqrt(r / cfg.head_dim)
    phi_o = query_blocks(cfg, np.asarray(phi_JAR)[None])[0]
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    y, y2 = _outputs(cfg, strategy, f32(w_o_HED), f32(q_BTHE), f32(k_BTKE), f32(v_BTKE), f32(psi_JAR),
                     f32(phi_JAR), f32(psi_q), f32(phi_o))
    return float(jnp.linalg.norm(y2 - y) / jnp.linalg.norm(y))
