"""Dynamic Memory Compression (Nawrot et al., 2024): decisions, partial accumulations, the training form."""
