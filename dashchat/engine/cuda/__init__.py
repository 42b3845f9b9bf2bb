"""CUDA-only pieces: decode steps replayed from captured CUDA graphs."""
