"""KV-head compression (Yu et al. 2024, arXiv 2406.07056): turn a model into one with fewer, shared KV heads.

    activations.py     per-layer q/k/v of real text, and the calibration Gram matrices of grouped keys / values
    mean_pool.py       the GQA up-training init (Ainslie et al. 2023): average the K/V weights of a group
    svd.py             SVD-a bases (top right singular vectors of the grouped calibration cache), SVD-w, and the
                       fold into W_k', W_v', W_q', W_o' (exact without RoPE; strategy B under RoPE)
    rope_projected.py  strategy A: bases of the rotated keys, q and k projected after RoPE at run time
    convert.py         one entry point: method name -> converted (cfg, params[, cache wrapper])
    options.py         the `kv_heads` config section
"""
