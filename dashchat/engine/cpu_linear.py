"""Float32 linear layers on CPU through oneDNN, with weights reordered once into its blocked layout.

PyTorch's F.linear on CPU calls MKL, whose small-batch GEMM read the weights at about half this
machine's memory bandwidth (an AMD EPYC: MKL picks generic kernels there). The same products
through oneDNN with pre-packed weights ran SmolLM2-135M's 30 layers of linears 1.8x faster at
batch 1, 2x at 8, 1.8x at 32 and 1.3x at prefill sizes (128-512 rows); decoding one token reads
every weight once, so this is most of a float32 decode step.

The packed weight is an opaque oneDNN tensor that torch.compile cannot trace, so the product is
a custom op that reaches the weight through a handle: a compiled graph calls it as an extern kernel.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from .quantize import float_bias

_packed: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
_handles = itertools.count()
_BATCH_HINT = 32  # oneDNN picks its blocking for this many rows; measured best across 1-512 rows


@torch.library.custom_op("dashchat::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _packed[handle], bias, "none", [None], "")


@packed_linear.register_fake
def _packed_linear_shape(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class PackedLinear(nn.Module):
    """nn.Linear for float32 on CPU, inputs [rows, in_features]."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().float(), _BATCH_HINT)
        self.handle = next(_handles)
        _packed[self.handle] = self.packed  # dropped with this module
        self.bias = float_bias(linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle, self.out_features, self.bias)
        # eager: straight to oneDNN; the custom op's Python dispatch cost ~20 us a call (2.5 ms a step)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")


def pack_linears(module: nn.Module) -> None:
    """Replace every nn.Linear below `module` in place (a tied head gets its own packed copy)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
