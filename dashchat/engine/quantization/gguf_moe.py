"""A mixture-of-experts layer's routed experts over GGUF blocks in one C call a step (moe_kernels.c).

The Python loop over used experts (SparseMoE.run_experts) costs a gather, two products, an
activation, a scale and an index_add a used expert: about 0.2 ms each, 8 a token at Qwen3-30B-A3B's
shape, and each product's thread team splits one expert's rows. Here the routing is turned into
(token, expert) pairs grouped by expert and the kernel does the rest: every expert's weights read
once for all its tokens, the (expert, row chunk) tasks spread over the cores. The products are the
same kernels on the same int8 activations, so the output is the loop's, bit for bit.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ...models.layers import GatedMLP, silu_and_mul
from ..cpu.kernels import kernel_library
from ..cpu.ops import kernel_silu_and_mul
from .gguf import FLOAT16_TYPES, GGUFLinear


def _part_of(linear: nn.Module, count: int) -> list | None:
    if not isinstance(linear, GGUFLinear) or linear.bias is not None or len(linear.parts) != count:
        return None
    return linear.parts


class GroupedGGUFExperts:
    """Runs `experts` (GatedMLPs with GGUF gate/up and down projections, SiLU) for routed tokens."""

    def __init__(self, experts: nn.ModuleList, lib: ctypes.CDLL) -> None:
        self._lib = lib
        gate, up, down = [], [], []
        for mlp in experts:
            gate_up, down_parts = _part_of(mlp.gate_up_proj, 2), _part_of(mlp.down_proj, 1)
            gate.append(gate_up[0]), up.append(gate_up[1]), down.append(down_parts[0])
        first = (gate[0], up[0], down[0])
        self.hidden, self.width = experts[0].gate_up_proj.in_features, experts[0].down_proj.in_features
        self._keep = [p.data for p in gate + up + down]  # the blocks the pointers below point into
        n = len(experts)
        self._args = (
            (ctypes.c_int * 3)(*(p.type_id for p in first)),
            (ctypes.c_int64 * 3)(*(p.data.shape[1] for p in first)),
            (ctypes.c_int * 3)(*(p.k_full for p in first)),
            (ctypes.c_int * 3)(*(p.k0 for p in first)),
            *((ctypes.c_void_p * n)(*(p.data.data_ptr() for p in parts)) for parts in (gate, up, down)),
        )

    @staticmethod
    def eligible(experts: nn.ModuleList) -> bool:
        """Every expert a SiLU GatedMLP over GGUF blocks of the same types and input windows (one
        3-D tensor a projection), its gate and up rows the same count."""
        shapes = set()
        for mlp in experts:
            if not isinstance(mlp, GatedMLP) or mlp.act_and_mul not in (silu_and_mul, kernel_silu_and_mul):
                return False
            gate_up, down = _part_of(mlp.gate_up_proj, 2), _part_of(mlp.down_proj, 1)
            if gate_up is None or down is None:
                return False
            parts = (*gate_up, *down)
            if (gate_up[0].rows != gate_up[1].rows or mlp.gate_up_proj.out_features != 2 * gate_up[0].rows
                    or down[0].rows != mlp.down_proj.out_features or mlp.down_proj.in_features != gate_up[0].rows
                    or (gate_up[0].type_name in FLOAT16_TYPES) != (gate_up[1].type_name in FLOAT16_TYPES)):
                return False
            shapes.add(tuple((p.type_name, p.rows, p.k_full, p.k0, p.data.shape[1]) for p in parts))
        return len(shapes) == 1

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        dtype, x = x.dtype, x.float().contiguous()
        top_k = chosen.shape[-1]
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self._args[4]))
        used = torch.nonzero(counts).reshape(-1)
        offsets = torch.zeros(len(used) + 1, dtype=torch.int32)
        torch.cumsum(counts[used], 0, out=offsets[1:])
        experts = used.to(torch.int32)
        pair_tokens = (order // top_k).contiguous()
        pair_weights = weights.reshape(-1)[order].float().contiguous()
        out = torch.zeros_like(x)
        status = self._lib.dc_moe_gguf(
            len(used), experts.data_ptr(), offsets.data_ptr(), pair_tokens.data_ptr(), pair_weights.data_ptr(),
            x.data_ptr(), self.hidden, self.width, *self._args, out.data_ptr())
        if status == -2:
            raise MemoryError("mixture-of-experts kernel: no memory for a step's expert products")
        if status:
            raise ValueError("mixture-of-experts kernel rejected an expert weight")
        return out.to(dtype)


def grouped_gguf_experts(experts: nn.ModuleList) -> GroupedGGUFExperts | None:
    """The one-call runner for these experts, or None (not all GGUF on the CPU, or no kernels)."""
    lib = kernel_library()
    if lib is None or not len(experts) or not GroupedGGUFExperts.eligible(experts):
        return None
    return GroupedGGUFExperts(experts, lib)

