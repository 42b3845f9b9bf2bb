"""RMSNorm, SwiGLU's activation and rotary embedding through the C kernels, for float32 models on CPU.

In an eager decode step PyTorch runs float32 rms_norm as five ops, silu(gate) * up as three and
the rotary embedding of q and k as sixteen, each a dispatch and a pass over memory; the kernels do
each in one call (the rotation in place). Under torch.compile the PyTorch forms stay (inductor
fuses them itself).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...models.layers import GatedMLP, RMSNorm, Rope, SelfAttention, apply_rope_qk, silu_and_mul
from ...models.moe import SparseMoE
from .kernels import kernel_library


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


def kernel_rope_qk(q: torch.Tensor, k: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    """q [N, Hq, D] and k [N, Hkv, D], rotated in place: views of the step's fused qkv output (rows
    strided, heads contiguous) or contiguous tensors."""
    cos, sin = rope
    whole_heads = 2 * cos.shape[-1] == q.shape[-1]  # partial rotary turns only part of each head
    if not (_eligible(q) and whole_heads and _rows_of_heads(q) and _rows_of_heads(k) and cos.is_contiguous()
            and sin.is_contiguous()):
        return apply_rope_qk(q, k, rope)
    lib = kernel_library()
    for x in (q, k):
        n, heads, d = x.shape
        lib.dc_rope_neox(x.data_ptr(), n, heads, d, x.stride(0), cos.data_ptr(), sin.data_ptr())
    return q, k


def _rows_of_heads(x: torch.Tensor) -> bool:
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2] and x.dtype == torch.float32


def use_cpu_kernels(model: nn.Module) -> bool:
    """Swap the model's norms, MLP activations and rotary embedding for the kernels' (False: no library);
    a mixture of experts routes in C and, over GGUF blocks, runs its routed experts in one kernel call."""
    if kernel_library() is None:
        return False
    from ..quantization.gguf_moe import use_moe_kernels  # it imports this module
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, RMSNorm):
                setattr(module, name, KernelRMSNorm(child))
        if isinstance(module, GatedMLP) and module.act_and_mul is silu_and_mul:  # GeGLU keeps PyTorch's
            module.act_and_mul = kernel_silu_and_mul
        if isinstance(module, SelfAttention):
            module.rope_qk = kernel_rope_qk
    for module in model.modules():
        if isinstance(module, SparseMoE):
            use_moe_kernels(module)
    return True
