"""Random GGUF weight blocks for the benches: random bytes are valid quantized blocks once their
float16 scale fields hold small finite values (random weights cost the same per token as trained
ones). One place for the block layout the benches write: sizes from dashchat's kernel table."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashchat.engine.quantization.gguf import BLOCK_TYPES  # noqa: E402

# byte offsets of each block's float16 fields (scale d, and dmin/min where the type has one)
FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
               "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "IQ4_NL": (0,),
               "IQ4_XS": (0,)}  # fmt: skip


def block_layout(type_name: str) -> tuple[int, int]:
    """(values a block, bytes a block)."""
    _, per_block, block_bytes = BLOCK_TYPES[type_name]
    return per_block, block_bytes


def random_blocks(rng: np.random.Generator, type_name: str, rows: int, cols: int, scale: float) -> np.ndarray:
    """[rows, bytes of a row] of random blocks whose float16 fields are normal(0, scale)."""
    per_block, block_bytes = block_layout(type_name)
    data = rng.integers(0, 256, size=(rows, cols // per_block, block_bytes), dtype=np.uint8)
    for off in FP16_FIELDS[type_name]:
        d = (rng.standard_normal((rows, cols // per_block), dtype=np.float32) * scale).astype(np.float16)
        data[:, :, off : off + 2] = d.view(np.uint8).reshape(rows, cols // per_block, 2)
    return data.reshape(rows, -1)
