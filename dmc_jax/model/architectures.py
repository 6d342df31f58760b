"""Published Llama-family architectures by name (Hugging Face config.json values), for planning a cluster run
(task plan) and for random-weight models of a real shape (model.source 'random:<name>', see weights/load.py)
without downloading any weights."""

from __future__ import annotations

ARCHITECTURES = {
    "llama2_7b": dict(vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128,
                      mlp_dim=11008, max_seq_len=4096),
    "llama2_13b": dict(vocab_size=32000, embed_dim=5120, num_layers=40, num_heads=40, num_kv_heads=40,
                       head_dim=128, mlp_dim=13824, max_seq_len=4096),
    "llama2_70b": dict(vocab_size=32000, embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, head_dim=128,
                       mlp_dim=28672, max_seq_len=4096),
    "llama3_8b": dict(vocab_size=128256, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      mlp_dim=14336, rope_theta=500000.0, max_seq_len=8192),
    "llama3_70b": dict(vocab_size=128256, embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8,
                       head_dim=128, mlp_dim=28672, rope_theta=500000.0, max_seq_len=8192),
    "smollm2_135m": dict(vocab_size=49152, embed_dim=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                         mlp_dim=1536, rope_theta=100000.0, tie_embeddings=True, max_seq_len=8192),
    "tiny": dict(vocab_size=259, embed_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                 max_seq_len=256),
}
# Hugging Face model names (meta- and -hf dropped, lower case) of the architectures above.
SOURCE_NAMES = {"llama-2-7b": "llama2_7b", "llama-2-13b": "llama2_13b", "llama-2-70b": "llama2_70b",
                "llama-3-8b": "llama3_8b", "llama-3.1-8b": "llama3_8b", "llama-3-70b": "llama3_70b",
                "llama-3.1-70b": "llama3_70b", "smollm2": "smollm2_135m", "smollm2-135m": "smollm2_135m",
                "smollm2-135m-instruct": "smollm2_135m"}
