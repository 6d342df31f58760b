"""SVD-a (and SVD-w) KV-head compression: shared heads from the top right singular vectors of grouped keys.

For a group of t KV heads, Psi [A, r] are the top r right singular vectors of the calibration cache K_G
(n x A, A = t * Dh: the group's keys side by side), Phi likewise for values. The shared head is
W_k' = W_k[:, G] Psi, W_v' = W_v[:, G] Phi; the projections fold into the other side: for a query head h whose
original KV head is block a of the group, W_q'[:, h] = W_q[:, h] Psi_a and W_o'[h] = Phi_a^T W_o[h]
(Psi_a = rows a*Dh..(a+1)*Dh of Psi). Without RoPE this is exact when r = A (Psi Psi^T = I); with RoPE, applying
it before the rotation (strategy B, a standard GQA model) is approximate because Psi_a does not commute with
RoPE. The new head dim is r; W_q' is scaled by sqrt(r / Dh) so the 1/sqrt(head_dim) softmax scale is unchanged.
SVD-w takes the right singular vectors of the weights W_k[:, G] (D x A) instead of the activations.

Shape letters: L layers, D embed, H query heads, K KV heads, J new KV heads (groups), t = K / J, A = t * Dh,
r new head dim (rank), Dh head dim.
"""

from __future__ import annotations

import numpy as np

from dmc_jax.kv_heads.mean_pool import check_groups
from dmc_jax.model.config import ModelConfig
from dmc_jax.model.params import Params


def top_basis(gram_LJAA: np.ndarray, rank: int) -> np.ndarray:
    """Top `rank` right singular vectors [L, J, A, r] of the caches whose Gram matrices are gram_LJAA."""
    A = gram_LJAA.shape[-1]
    if not 1 <= rank <= A:
        raise ValueError(f"rank must be in [1, {A}] (t * head_dim); got {rank}")
    _, vecs_LJAA = np.linalg.eigh(np.asarray(gram_LJAA, np.float64))  # ascending eigenvalues
    return vecs_LJAA[..., ::-1][..., :rank]


def weight_grams(params: Params, new_kv_heads: int) -> dict:
    """SVD-w statistics: W^T W [L, J, A, A] of the grouped K and V projection weights."""
    out = {}
    for name in ("k", "v"):
        w_LDKD = np.asarray(params["layers"][name], np.float64)
        L, D, K, Dh = w_LDKD.shape
        w_LDJA = w_LDKD.reshape(L, D, new_kv_heads, (K // new_kv_heads) * Dh)
        out[name] = np.einsum("ldja,ldjb->ljab", w_LDJA, w_LDJA)
    return out


def query_blocks(cfg: ModelConfig, basis_LJAR: np.ndarray) -> np.ndarray:
    """basis_LJAR's block for each query head [L, H, Dh, r]: the rows of the head's original KV head."""
    L, J, A, r = basis_LJAR.shape
    t, Dh, G = A // cfg.head_dim, cfg.head_dim, cfg.group_size
    kv_H = np.arange(cfg.num_heads) // G  # original KV head of each query head
    return basis_LJAR.reshape(L, J, t, Dh, r)[:, kv_H // t, kv_H % t]


def fold_values(cfg: ModelConfig, layers: dict, phi_LJAR: np.ndarray) -> dict:
    """W_v' = W_v[:, G] Phi and W_o'[h] = Phi_a^T W_o[h] (values carry no RoPE: exact at full rank)."""
    L, J, A, r = phi_LJAR.shape
    w_v = np.asarray(layers["v"], np.float64)
    v_LDJR = np.einsum("ldja,ljar->ldjr", w_v.reshape(L, w_v.shape[1], J, A), phi_LJAR)
    o_LHRD = np.einsum("lher,lhed->lhrd", query_blocks(cfg, phi_LJAR), np.asarray(layers["o"], np.float64))
    return {"v": v_LDJR, "o": o_LHRD}


def fold(cfg: ModelConfig, params: Params, psi_LJAR: np.ndarray, phi_LJAR: np.ndarray) -> tuple[ModelConfig, Params]:
    """The converted model (strategy B under RoPE: project before the rotation): J KV heads of dim r."""
    L, J, A, r = psi_LJAR.shape
    check_groups(cfg, J)
    layers = dict(params["layers"])
    dtype = np.asarray(layers["k"]).dtype
    w_k = np.asarray(layers["k"], np.float64)
    new = fold_values(cfg, layers, phi_LJAR)
    new["k"] = np.einsum("ldja,ljar->ldjr", w_k.reshape(L, w_k.shape[1], J, A), psi_LJAR)
    scale = np.sqrt(r / cfg.head_dim)
    new["q"] = np.einsum("ldhe,lher->ldhr", np.asarray(layers["q"], np.float64), query_blocks(cfg, psi_LJAR)) * scale
    layers.update({name: x.astype(dtype) for name, x in new.items()})
    return cfg.replace(num_kv_heads=J, head_dim=r), {**params, "layers": layers}
