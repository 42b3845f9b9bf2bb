"""The mixture-of-experts MLP of Qwen3-MoE, Qwen2-MoE and Mixtral.

A router scores every expert for each token and only the top k run. A step's tokens are grouped
by expert (sorted by expert id) and each chosen expert runs once on all of its tokens, so an
expert's weights are read once a step however many tokens picked it, and an expert no token
picked is not read at all. Each expert is a GatedMLP whose linears are ordinary modules, so
whatever the engine does to linears (oneDNN packing, GGUF blocks: each expert's rows of the
file's 3-D expert tensor, int8/int4) applies to experts as well.

Under tensor parallelism every rank holds a slice of every expert (and of the shared expert),
like a dense MLP; the partial outputs of the whole block are summed over ranks once. The router
is replicated, so every rank picks the same experts.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import DecoderLayer, GatedMLP
from .parallel import SINGLE, ShardPlan, TensorParallel


def softmax_top_k(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] float32, expert ids [N, k]): softmax over all experts in float32, the top k
    kept, renormalised over them when `normalize`."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, chosen = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, chosen


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        moe = cfg.moe
        plan = ShardPlan(cfg, tp.rank, tp.size)
        self.tp = tp
        self.top_k, self.norm_topk_prob = moe.top_k, moe.norm_topk_prob
        hidden = cfg.hidden_size
        self.gate = nn.Linear(hidden, moe.num_experts, bias=False)  # the router
        # SINGLE: an expert's partial output is not reduced on its own; the block's sum is
        self.experts = nn.ModuleList(GatedMLP(hidden, plan.mlp_width("expert")) for _ in range(moe.num_experts))
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_intermediate_size:
            self.shared_expert = GatedMLP(hidden, plan.mlp_width("shared"))
            self.shared_expert_gate = nn.Linear(hidden, 1, bias=False)
        # an engine may set a callable (x, weights, chosen) -> out that runs the routed experts its way,
        # and its own forms of the routing (softmax_top_k's contract) and of the shared expert's gate
        self.expert_runner = None
        self.softmax_top_k = softmax_top_k
        self.shared_gate_act = torch.sigmoid

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] in x's dtype, expert ids [N, k]): softmax over all experts in float32, the
        top k kept, renormalised over them where the model does."""
        weights, chosen = self.softmax_top_k(self.gate(x).float(), self.top_k, self.norm_topk_prob)
        return weights.to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.route(x)
        runner = self.expert_runner
        out = self.run_experts(x, weights, chosen) if runner is None else self._run(runner, x, weights, chosen)
        if self.shared_expert is not None:
            out = out + self.shared_gate_act(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)

    @staticmethod
    @torch.compiler.disable
    def _run(runner, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        return runner(x, weights, chosen)

    # The loop's trip count and slices come from the routing: under torch.compile (--compile) it runs
    # eagerly between the compiled parts instead of recompiling for every pattern of expert counts.
    @torch.compiler.disable
    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """Sum over each token's chosen experts of weight * expert(token), one call per used expert."""
        flat = chosen.reshape(-1)
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # one host sync a layer
        tokens = order // self.top_k
        scale = weights.reshape(-1)[order].unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                rows = tokens[start : start + count]
                out.index_add_(0, rows, self.experts[expert](x[rows]) * scale[start : start + count])
                start += count
        return out


class MoeDecoderLayer(DecoderLayer):
    """The Llama block with a mixture of experts as its MLP (where the config makes the layer one)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__(cfg, layer_idx, tp, SparseMoE(cfg, tp) if cfg.is_moe_layer(layer_idx) else None)
