"""A direct, token-by-token reference of DMS inference (the definition, no cache tricks), for tests only.

For each query t, key j <= t of the same sequence is visible iff t - j <= w or token j was not marked (the decision
of token j + 1); softmax over the visible keys. Slow and obvious on purpose.

Shape letters: B batch, T time, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

import numpy as np



def sequential_dms(q_BTHD, k_BTKD, v_BTKD, marks_BTK, window: int):
    """Outputs [B, T, H, Dh] (numpy, fp64) and keys visible to the last query per (b, k).

    q and k are already rotated (q with its decision channel zeroed); marks_BTK[b, t, k] = 1 if token t marks
    token t - 1 for eviction."""
    q, k, v = (np.asarray(x, np.float64) for x in (q_BTHD, k_BTKD, v_BTKD))
    marks = np.asarray(marks_BTK) > 0.5
    B, T, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    out = np.zeros((B, T, H, Dh))
    visible_last = np.zeros((B, K), np.int64)
    for b in range(B):
        for kh in range(K):
            for t in range(T):
                keys = [j for j in range(t + 1) if t - j <= window or not (j + 1 <= t and marks[b, j + 1, kh])]
                visible_last[b, kh] = len(keys)
                for g in range(G):
                    h = kh * G + g
                    logits = np.array([q[b, t, h] @ k[b, j, kh] for j in keys]) / np.sqrt(Dh)
                    p = np.exp(logits - logits.max())
                    out[b, t, h] = (p / p.sum()) @ v[b, keys, kh]
    return out, visible_last
