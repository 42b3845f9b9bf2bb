"""Weight quantization for the CPU: int8 (SmoothQuant) and int4 (groups of 32)."""
