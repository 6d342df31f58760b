"""Dynamic Memory Sparsification (Lancucki et al., 2025): learned, delayed per-head eviction."""
