"""CPU kernels and helpers: C kernels, oneDNN-packed linears, thread counts."""
