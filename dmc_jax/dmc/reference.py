"""A direct, token-by-token reference of DMC inference (the spec's cache update), for tests only.

Per sequence and KV head it keeps a Python list of slots. Appending opens a slot; accumulating overwrites the
last slot with the omega-weighted mean of the current run (the last `window` tokens of it) rotated at the newest
token's position. Every query attends to all slots, the one just written included. Slow and obvious on purpose.

Shape letters: B batch, T time, H query heads, K KV heads, Dh head dim.
"""

from __future__ import annotations

from typing import Optional

from dmc_jax.model.layers import Rope

import numpy as np


def sequential_dmc(q_BTHD, k_BTKD, v_BTKD, alpha_BTK, omega_BTK, rope: Rope, ch: int, window: Optional[int],
                   segment_ids_BT=None, zero_after_rope: bool = True):
    """Outputs [B, T, H, Dh] (numpy, fp64 math) and slots kept per (b, k) at the end; alpha is 0/1 (hard)."""
    q = np.asarray(q_BTHD, np.float64)
    k = np.asarray(k_BTKD, np.float64)
    v = np.asarray(v_BTKD, np.float64)
    alpha = np.asarray(alpha_BTK)
    omega = np.asarray(omega_BTK, np.float64)
    B, T, H, Dh = q.shape
    K = k.shape[2]
    G = H // K
    seg = np.zeros((B, T), np.int64) if segment_ids_BT is None else np.asarray(segment_ids_BT)
    out = np.zeros((B, T, H, Dh))
    kept = np.zeros((B, K), np.int64)

    inv_freq = np.asarray(rope.inv_freq, np.float64)

    def rotate(x_D, pos):
        cos, sin = np.cos(pos * inv_freq), np.sin(pos * inv_freq)
        x1, x2 = x_D[:Dh // 2], x_D[Dh // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin])

    for b in range(B):
        for kh in range(K):
            slots_k, slots_v, run = [], [], []
            pos = 0
            for t in range(T):
                new_sequence = t == 0 or seg[b, t] != seg[b, t - 1]
                if new_sequence:
                    slots_k, slots_v, run, pos = [], [], [], 0
                entry = (omega[b, t, kh], k[b, t, kh], v[b, t, kh])
                if new_sequence or alpha[b, t, kh] == 0:
                    run = [entry]
                    slots_k.append(None)
                    slots_v.append(None)
                else:
                    run.append(entry)
                recent = run if window is None else run[-window:]
                z = sum(w for w, _, _ in recent)
                key = sum(w * x for w, x, _ in recent) / z
                val = sum(w * x for w, _, x in recent) / z
                key = rotate(key, pos)
                if zero_after_rope:
                    key[ch] = 0.0
                slots_k[-1], slots_v[-1] = key, val
                keys, vals = np.stack(slots_k), np.stack(slots_v)
                for g in range(G):
                    h = kh * G + g
                    qr = rotate(q[b, t, h], pos)
                    if zero_after_rope:
                        qr[ch] = 0.0
                    logits = keys @ qr / np.sqrt(Dh)
                    p = np.exp(logits - logits.max())
                    out[b, t, h] = (p / p.sum()) @ vals
                pos += 1
            kept[b, kh] = len(slots_k)
    return out, kept
