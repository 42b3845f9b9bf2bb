"""A mixture-of-experts layer's routed experts over GGUF blocks in one C call a step (moe_kernels.c).

The Python loop over used experts (SparseMoE.run_experts) costs a gather, two products, an
activation, a scale and an index_add a used expert: about 0.2 ms each, 8 a token at Qwen3-30B-A3B's
shape, and each product's thread team splits one expert's rows. Here the kernel turns the routing
into (token, expert) pairs grouped by expert and does the rest: every expert's weights read once
for all its tokens, the (expert, row chunk) tasks spread over the cores. The products are the same
kernels on the same int8 activations, so the output is the loop's, bit for bit.

The routing itself (softmax, top k) and the shared expert's sigmoid gate run in C as well on the
CPU kernels' path (kernel_softmax_top_k, kernel_sigmoid): the fused decode step (decode_step.c)
calls the same functions, so both paths pick the same experts with the same weights.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from ...models.layers import GatedMLP, silu_and_mul
from ...models.moe import SparseMoE, softmax_top_k
from ..cpu.kernels import kernel_library
from ..cpu.linear import _PANEL, PackedLinear
from ..cpu.ops import kernel_silu_and_mul
from .gguf import FLOAT16_TYPES, GGUFLinear


def _on_kernels(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and not torch.compiler.is_compiling()


def kernel_softmax_top_k(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """models.moe.softmax_top_k in C (float32 CPU logits): a tie goes to the lower expert id."""
    if not _on_kernels(logits):
        return softmax_top_k(logits, k, normalize)
    logits = logits.contiguous()
    m, n = logits.shape
    weights, chosen = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
    if kernel_library().dc_moe_route(logits.data_ptr(), m, n, k, int(normalize), weights.data_ptr(),
                                       chosen.data_ptr()):
        raise MemoryError("mixture-of-experts routing: no memory")
    return weights, chosen


def kernel_sigmoid(x: torch.Tensor) -> torch.Tensor:
    if not _on_kernels(x):
        return torch.sigmoid(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    kernel_library().dc_sigmoid(x.data_ptr(), out.data_ptr(), x.numel())
    return out


def _part_of(linear: nn.Module, count: int) -> list | None:
    if not isinstance(linear, GGUFLinear) or linear.bias is not None or len(linear.parts) != count:
        return None
    return linear.parts


class GroupedGGUFExperts:
    """Runs `experts` (GatedMLPs with GGUF gate/up and down projections, SiLU) for routed tokens."""

    def __init__(self, experts: nn.ModuleList, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self.count = len(experts)
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
        weights = weights.float().contiguous()
        chosen = chosen.to(torch.int64).contiguous()
        out = torch.zeros_like(x)
        status = self._lib.dc_moe_gguf_routed(
            x.shape[0], chosen.shape[-1], self.count, weights.data_ptr(), chosen.data_ptr(), x.data_ptr(),
            self.hidden, self.width, *self._args, out.data_ptr())
        if status == -2:
            raise MemoryError("mixture-of-experts kernel: no memory for a step's expert products")
        if status:
            raise ValueError("mixture-of-experts kernel rejected an expert weight (or an expert id)")
        return out.to(dtype)


def grouped_gguf_experts(experts: nn.ModuleList) -> GroupedGGUFExperts | None:
    """The one-call runner for these experts, or None (not all GGUF on the CPU, or no kernels)."""
    lib = kernel_library()
    if lib is None or not len(experts) or not GroupedGGUFExperts.eligible(experts):
        return None
    return GroupedGGUFExperts(experts, lib)



class PanelGate(nn.Module):
    """A mixture of experts' float32 gate (Qwen2-MoE's one-output shared-expert gate) as a PackedLinear
    could not give the small-batch kernel (oneDNN chose another layout for it): its weight, read back
    out of oneDNN's packing exactly (a product with the identity), held in the kernel's 64-row panels
    and multiplied by it at every row count, on the module path and in the fused decode step alike."""

    def __init__(self, packed: PackedLinear) -> None:
        super().__init__()
        n, k = packed.out_features, packed.in_features
        eye = torch.eye(k)
        weight = torch.ops.mkldnn._linear_pointwise(eye, packed.packed, None, "none", [None], "").t()  # [n, k]
        panels = -(-n // _PANEL)
        blocks = torch.zeros(panels * _PANEL, k)
        blocks[:n] = weight
        # panel p holds, for each input c, its 64 rows' weights side by side: [panels, k, 64]
        self.panels = blocks.reshape(panels, _PANEL, k).transpose(1, 2).contiguous()
        self.bias = packed.bias
        self.out_features, self.in_features = n, k
        self.weight_ptr, self.bias_ptr = self.panels.data_ptr(), None if self.bias is None else self.bias.data_ptr()
        self._lib = kernel_library()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float().contiguous()
        y = x.new_empty(x.shape[0], self.out_features)
        self._lib.dc_linear_ab64a(x.data_ptr(), self.weight_ptr, self.bias_ptr, y.data_ptr(), x.shape[0],
                                  self.out_features, self.in_features)
        return y.reshape(*shape[:-1], self.out_features)


def use_moe_kernels(moe: SparseMoE) -> None:
    """A mixture of experts on the CPU kernels: routing and the shared expert's gate in C, the routed
    experts in one call a step where they are GGUF blocks, a float gate the small-batch kernel cannot
    read as packed held as a PanelGate."""
    moe.expert_runner = grouped_gguf_experts(moe.experts)
    moe.softmax_top_k, moe.shared_gate_act = kernel_softmax_top_k, kernel_sigmoid
    for name in ("gate", "shared_expert_gate"):
        gate = getattr(moe, name)
        if isinstance(gate, PackedLinear) and gate._weight_ptr is None:
            setattr(moe, name, PanelGate(gate))
