"""Float32 linear layers on CPU through oneDNN, with weights reordered once into its blocked layout.

PyTorch's F.linear on CPU calls MKL, whose small-batch GEMM read the weights at about half this
machine's memory bandwidth (an AMD EPYC: MKL picks generic kernels there). The same products
through oneDNN with pre-packed weights ran SmolLM2-135M's 30 layers of linears 1.8x faster at
batch 1, 2x at 8, 1.8x at 32 and 1.3x at prefill sizes (128-512 rows); decoding one token reads
every weight once, so this is most of a float32 decode step.

Up to 16 rows (decode steps) a small C kernel (kernels.c) reads the same packed buffer in place
and streams it near memory bandwidth, where oneDNN reaches about half; a check product at load
time confirms that oneDNN chose the layout the kernel reads, else the layer keeps oneDNN alone.

The packed weight is an opaque oneDNN tensor that torch.compile cannot trace, so the product is
a custom op that reaches its layer through a handle: a compiled graph calls it as an extern kernel.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from .kernels import kernel_library
from ..quantization.int8 import float_bias

_layers: weakref.WeakValueDictionary[int, "PackedLinear"] = weakref.WeakValueDictionary()
_handles = itertools.count()
_BATCH_HINT = 32  # oneDNN picks its blocking for this many rows; measured best across 1-512 rows
# Rows up to which the streaming kernel runs: it was 1.1-2x oneDNN's speed at 1-16 rows and even
# at 32, where the product turns compute-bound and oneDNN's GEMM is the better tool.
SMALL_BATCH_ROWS = 16
_PANEL = 64  # output rows per block of oneDNN's layout "Ab64a", the one kernels.c reads


@torch.library.custom_op("dashchat::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return _layers[handle].product(x)


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
        _layers[self.handle] = self  # dropped with this module
        self.bias = float_bias(linear)
        self._bias_ptr = None if self.bias is None else self.bias.data_ptr()
        self._gemv = kernel_library()
        self._weight_ptr = self._readable_weight() if self._gemv is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle, self.out_features, self.bias)
        # eager: no custom op, whose Python dispatch cost ~20 us a call (2.5 ms a step)
        return self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        if self._weight_ptr is not None and x.shape[0] <= SMALL_BATCH_ROWS and x.dim() == 2:
            return self._small_batch(x)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")

    def _small_batch(self, x: torch.Tensor, weight_ptr: int | None = None) -> torch.Tensor:
        x = x.contiguous()
        y = x.new_empty(x.shape[0], self.out_features)
        self._gemv.dc_linear_ab64a(x.data_ptr(), weight_ptr or self._weight_ptr, self._bias_ptr, y.data_ptr(),
                                   x.shape[0], self.out_features, self.in_features)
        return y

    def _readable_weight(self) -> int | None:
        """The packed buffer's address if it is laid out as the kernel reads it, else None."""
        n, k = self.out_features, self.in_features
        if torch.ops.mkldnn._nbytes(self.packed) != -(-n // _PANEL) * _PANEL * k * 4:
            return None
        ptr = torch.ops.mkldnn.data_ptr(self.packed)
        # oneDNN picks its layout per CPU: one product through both paths tells whether it is ours.
        x = torch.randn(3, k, generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
        ours = self._small_batch(x, ptr)
        theirs = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [None], "")
        return ptr if torch.allclose(ours, theirs, rtol=1e-3, atol=1e-3) else None


def pack_linears(module: nn.Module) -> None:
    """Replace every nn.Linear below `module` in place (a tied head gets its own packed copy)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, PackedLinear(child))
        else:
            pack_linears(child)
