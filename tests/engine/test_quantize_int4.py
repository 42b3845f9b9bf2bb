"""Int4 packing: GGUF Q4_1-shaped weights come back as they were; other weights round to nearest."""

from __future__ import annotations

import torch
from torch import nn

from dashchat.engine.quantization.int4 import GROUP, Int4Linear, pack_int4


def _dequantized(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What Int4Linear computes with, read back through an identity input."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight.data = weight
    if bias is not None:
        linear.bias.data = bias
    return Int4Linear(linear)(torch.eye(weight.shape[1])).t()


def test_q4_1_weights_survive_packing():
    """Q4_1 blocks: scale * q + minimum, q spanning 0..15 (the quantizer's own min and max)."""
    g = torch.Generator().manual_seed(0)
    groups = (64, 128 // GROUP, 1)
    scale = (torch.rand(groups, generator=g) * 0.02 + 0.001).bfloat16().float()
    low = (-torch.rand(groups, generator=g) * 0.1).bfloat16().float()
    q = torch.randint(0, 16, (64, 128 // GROUP, GROUP), generator=g).float()
    q[..., 0], q[..., 1] = 0, 15
    weight = (q * scale + low).view(64, 128)
    # bfloat16 keeps 8 significant bits of the stored zero point and of the output.
    tolerance = 2**-8 * (weight.abs() + low.abs().repeat_interleave(GROUP, 1).view(64, 128) + 8 * 0.021)
    assert ((_dequantized(weight) - weight).abs() <= tolerance).all()


def test_general_weights_round_to_nearest_within_half_a_step():
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    _, scales_and_zeros = pack_int4(weight)
    step = scales_and_zeros[..., 0].float().t().repeat_interleave(GROUP, dim=1)  # [out, in]
    assert ((_dequantized(weight) - weight).abs() <= step * 0.5 + 2**-7 * (weight.abs() + 8 * step)).all()


def test_bias_is_added_in_float32():
    weight = torch.zeros(16, 32)
    bias = torch.arange(16, dtype=torch.float32) / 3
    linear = nn.Linear(32, 16)
    linear.weight.data, linear.bias.data = weight, bias
    torch.testing.assert_close(Int4Linear(linear)(torch.ones(2, 32)), bias.expand(2, 16))
