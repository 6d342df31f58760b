"""Named rematerialization policies for the layer scan: what each layer keeps for the backward pass.

    none                     keep every intermediate (fastest, most memory)
    full                     keep only the layer input; recompute the layer in the backward pass (least memory)
    dots                     keep matmul outputs, recompute the elementwise ops (norms, RoPE, softmax, SwiGLU gate)
    dots_with_no_batch_dims  keep only matmuls without batch dimensions (the weight projections q/k/v/o, MLP), not
                             the attention score / value einsums over heads (their [B, H, T, T] tensors are huge)

model.remat_policy picks one; '' follows the older switch model.remat (True = 'full', False = 'none').
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")


def policy_name(remat: bool, remat_policy: str = "") -> str:
    """The effective policy: remat_policy when set, else 'full' / 'none' from the boolean."""
    return remat_policy or ("full" if remat else "none")


def _policy(name: str) -> Optional[Callable]:
    cp = jax.checkpoint_policies
    return {"full": cp.nothing_saveable, "dots": cp.checkpoint_dots,
            "dots_with_no_batch_dims": cp.dots_with_no_batch_dims_saveable}[name]


def wrap(layer_fn: Callable, remat: bool, remat_policy: str = "") -> Callable:
    """layer_fn under jax.checkpoint with the named policy (unchanged for 'none')."""
    name = policy_name(remat, remat_policy)
    if name not in POLICIES:
        raise ValueError(f"model.remat_policy must be one of {', '.join(POLICIES)}; got {name!r}")
    if name == "none":
        return layer_fn
    return jax.checkpoint(layer_fn, prevent_cse=False, policy=_policy(name))
