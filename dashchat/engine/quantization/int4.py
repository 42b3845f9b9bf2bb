"""Int4 linear layers for CPU decoding: 4-bit weights in groups of 32 with a scale and a minimum.

That is the layout of GGUF's Q4_1 and of Q4_K's 32-weight sub-blocks, so a model that came as such
a GGUF gets its own weights back (up to the bfloat16 rounding of scales) rather than a second
rounding; other weights are rounded to nearest per group. The product is torch's
`_weight_int4pack_mm_for_cpu` with bfloat16 activations: on this AVX-512 CPU it ran SmolLM2-135M's
30 layers of linears in 4.1 ms for one token against 9.2 ms for the int8 path (half the bytes, no
activation quantization); with float32 activations the same kernel is ~25x slower.

The output head stays int8 (`Int8Linear`, per-token activations): it is the layer whose errors
reach the sampled token directly.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .int8 import Int8Linear, float_bias

log = logging.getLogger(__name__)

GROUP = 32


def pack_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed uint8 weight, bfloat16 scales_and_zeros [in / GROUP, out, 2])."""
    n, k = weight.shape
    w = weight.detach().float().view(n, k // GROUP, GROUP)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    q = ((w - lo) / scale).round_().clamp_(0, 15).view(n, k).to(torch.int32)
    # The kernel computes (q - 8) * scale + zero, so zero is the group's minimum moved by 8 steps.
    zero = lo + 8 * scale
    scales_and_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], dim=-1).transpose(0, 1)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros.contiguous().to(torch.bfloat16)


class Int4Linear(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        packed, scales_and_zeros = pack_int4(linear.weight)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)
        self.bias = float_bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), self.packed, GROUP, self.scales_and_zeros)
        y = y.float()
        return y if self.bias is None else y.add_(self.bias)


def int4_supported(linear: nn.Linear) -> bool:
    return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0


def _mlp_parts(mlp: nn.Module) -> list[nn.Module]:
    """The modules holding an MLP's linears: the MLP, or a mixture's experts and shared expert (its
    router stays float: rounding there changes which experts run)."""
    experts = getattr(mlp, "experts", None)
    if experts is None:
        return [mlp]
    return [*experts, *([mlp.shared_expert] if mlp.shared_expert is not None else [])]


def quantize_linears_int4(model: nn.Module) -> None:
    """Every decoder-layer nn.Linear to Int4Linear (float kept where the shape does not fit), the
    head to Int8Linear."""
    for layer in model.layers:
        for parent in (layer.self_attn, *_mlp_parts(layer.mlp)):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    if int4_supported(child):
                        setattr(parent, name, Int4Linear(child))
                    else:  # e.g. a tensor-parallel shard whose rows are not whole groups of 32
                        log.info("int4: %s [%d x %d] stays float (shape not in groups of %d)", name,
                                 child.out_features, child.in_features, GROUP)
    model.lm_head = Int8Linear(model.lm_head)  # a tied head gets its own copy: the embedding stays
