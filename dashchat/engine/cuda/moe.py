"""A mixture-of-experts layer's routed experts on CUDA: one grouped GEMM a projection for all experts.

The step's (token, expert) pairs are sorted by expert; the experts' gate/up weights are one stacked
tensor [experts, 2 * width, hidden] and their down weights another, so `torch._grouped_mm` (CUTLASS
on sm90+, bfloat16, group ends as int32 offsets) runs every expert's rows in one launch, and no
count leaves the device (no host sync a layer). Each expert's own linear keeps a view of its slice
of the stack, so the weights are held once. Where the grouped GEMM is not available (an older torch
or GPU, another dtype) the same sorted rows go through one torch.mm per used expert.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ...models.layers import GatedMLP
from ...models.moe import SparseMoE

log = logging.getLogger(__name__)


def grouped_mm_available(weight: torch.Tensor) -> bool:
    """torch._grouped_mm's own kernel takes these weights: bfloat16 on an sm90+ GPU, widths whole
    16-byte runs (its alignment rule), a torch that has it."""
    if not hasattr(torch, "_grouped_mm") or weight.dtype != torch.bfloat16 or weight.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(weight.device) < (9, 0):
        return False
    return all(d % 8 == 0 for d in weight.shape[1:])


class GroupedExperts:
    """Runs a SparseMoE's routed experts from stacked weights; `grouped` None: decide from the weights."""

    def __init__(self, experts: nn.ModuleList, grouped: bool | None = None) -> None:
        self.act_and_mul = experts[0].act_and_mul
        self.gate_up = torch.stack([e.gate_up_proj.weight.detach() for e in experts])  # [E, 2I, H]
        self.down = torch.stack([e.down_proj.weight.detach() for e in experts])  # [E, H, I]
        for i, e in enumerate(experts):  # the experts read their slice of the stacks: one copy held
            e.gate_up_proj.weight = nn.Parameter(self.gate_up[i], requires_grad=False)
            e.down_proj.weight = nn.Parameter(self.down[i], requires_grad=False)
        self.grouped = grouped_mm_available(self.gate_up) if grouped is None else grouped

    @staticmethod
    def eligible(experts: nn.ModuleList) -> bool:
        """Every expert a GatedMLP of plain float linears without bias, one dtype and shape."""
        kinds = set()
        for e in experts:
            if not isinstance(e, GatedMLP) or type(e.gate_up_proj) is not nn.Linear or type(e.down_proj) is not nn.Linear:
                return False
            if e.gate_up_proj.bias is not None or e.down_proj.bias is not None:
                return False
            kinds.add((e.gate_up_proj.weight.shape, e.down_proj.weight.shape, e.gate_up_proj.weight.dtype,
                       e.act_and_mul))
        return len(kinds) == 1

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        tokens = order // chosen.shape[-1]
        rows = x[tokens]
        counts = torch.bincount(flat, minlength=self.gate_up.shape[0])
        if self.grouped:
            ends = torch.cumsum(counts, 0, dtype=torch.int32)
            h = torch._grouped_mm(rows, self.gate_up.transpose(1, 2), offs=ends)
            y = torch._grouped_mm(self.act_and_mul(h), self.down.transpose(1, 2), offs=ends)
        else:
            y = torch.empty_like(rows)
            start = 0
            for expert, count in enumerate(counts.tolist()):  # a host sync a layer
                if count:
                    part = rows[start : start + count]
                    h = torch.mm(part, self.gate_up[expert].t())
                    torch.mm(self.act_and_mul(h), self.down[expert].t(), out=y[start : start + count])
                    start += count
        y = y * weights.reshape(-1)[order].unsqueeze(1)
        return torch.zeros_like(x).index_add_(0, tokens, y)


def use_grouped_experts(model: nn.Module) -> int:
    """Give every SparseMoE of a model on CUDA its stacked-weight runner; the number of layers given one."""
    done = 0
    for module in model.modules():
        if isinstance(module, SparseMoE) and module.expert_runner is None and GroupedExperts.eligible(module.experts):
            module.expert_runner = GroupedExperts(module.experts)
            done += 1
            if done == 1:
                log.info("mixture of experts: %s", "one grouped GEMM a projection (torch._grouped_mm)"
                         if module.expert_runner.grouped else "one torch.mm a used expert (no grouped GEMM here)")
    return done
