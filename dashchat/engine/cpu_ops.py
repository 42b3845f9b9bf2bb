"""RMSNorm and SwiGLU's activation through the C kernels, for float32 models on CPU.

In an eager decode step PyTorch runs float32 rms_norm as five ops and silu(gate) * up as three,
each a dispatch and a pass over memory; the kernels do each in one call. Under torch.compile the
PyTorch forms stay (inductor fuses them itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import GatedMLP, RMSNorm, silu_and_mul
from .cpu_kernels import kernel_library


def _eligible(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()


class KernelRMSNorm(nn.Module):
    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.weight = nn.Parameter(norm.weight.detach().float().contiguous(), requires_grad=False)
        self.eps = norm.eps
        self._lib = kernel_library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _eligible(x):
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x = x.contiguous()
        out = torch.empty_like(x)
        cols = x.shape[-1]
        self._lib.dc_rms_norm(x.data_ptr(), self.weight.data_ptr(), out.data_ptr(), x.numel() // cols, cols, self.eps)
        return out


def kernel_silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if not _eligible(gate_up):
        return silu_and_mul(gate_up)
    gate_up = gate_up.contiguous()
    cols = gate_up.shape[-1] // 2
    out = gate_up.new_empty(*gate_up.shape[:-1], cols)
    kernel_library().dc_silu_and_mul(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // (2 * cols), cols)
    return out


def use_cpu_kernels(model: nn.Module) -> bool:
    """Swap the model's norms and MLP activations for the kernels' (False: no kernel library)."""
    if kernel_library() is None:
        return False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                setattr(module, name, KernelRMSNorm(child))
        if isinstance(module, GatedMLP):
            module.act_and_mul = kernel_silu_and_mul
    return True
