"""Pure-jnp reference of DMC training attention (causal GQA softmax attention with a per-key merge penalty).

logit(t, j) = q_t . k_j * sm_scale + pen[k, j] * [j < t],  allowed where j <= t (and same segment if given)

The penalty of key j (DMC: log(1 - alpha_{j+1})) hides a slot that a later token merged into; the diagonal j = t
is exempt, so every row keeps at least one key. This materialises T x T logits: it is the specification the
flash kernel (dmc_flash.py) is tested against, and its autodiff gives the reference gradients.

Shape letters: B batch, T time, H query heads, K KV heads, G = H / K, Dh head dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dmc_flash_ref(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, pen_BKT: jax.Array,
                  segment_ids_BT: jax.Array | None = None, sm_scale: float | None = None) -> jax.Array:
    """Attention output [B, T, H, Dh] (fp32 softmax, probabilities cast to v's dtype before the value product)."""
    B, T, H, Dh = q_BTHD.shape
    K = k_BTKD.shape[2]
    scale = Dh ** -0.5 if sm_scale is None else sm_scale
    hi = jax.lax.Precision.HIGHEST
    q_BTKGD = q_BTHD.reshape(B, T, K, H // K, Dh)
    s_BKGTS = jnp.einsum("btkgd,bskd->bkgts", q_BTKGD, k_BTKD, preferred_element_type=jnp.float32,
                         precision=hi) * scale
    t_T = jnp.arange(T)
    below_TS = t_T[None, :] < t_T[:, None]
    allowed_BTS = jnp.broadcast_to(t_T[None, :] <= t_T[:, None], (B, T, T))
    if segment_ids_BT is not None:
        allowed_BTS = allowed_BTS & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])
    bias_BKTS = jnp.where(below_TS[None, None], pen_BKT.astype(jnp.float32)[:, :, None, :], 0.0)
    s_BKGTS = jnp.where(allowed_BTS[:, None, None], s_BKGTS + bias_BKTS[:, :, None], -jnp.inf)
    p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1)
    out_BTKGD = jnp.einsum("bkgts,bskd->btkgd", p_BKGTS.astype(v_BTKD.dtype), v_BTKD,
                           preferred_element_type=jnp.float32, precision=hi)
    return out_BTKGD.reshape(B, T, H, Dh).astype(q_BTHD.dtype)
