"""Tensor parallelism inside the model: which slice of each weight a rank holds, and the layers
whose outputs must be combined across ranks.

The split is Megatron's: q/k/v and gate/up are split by output columns (each rank owns whole
attention heads and a slice of the MLP), o_proj and down_proj by input rows followed by a sum over
ranks (a mixture of experts likewise: each rank a slice of every expert and of the shared expert,
one sum over ranks for the whole block; the router is replicated), the embedding and the output head by vocabulary rows (the logits are gathered for
sampling). KV heads are split too; where there are fewer KV heads than ranks, each KV head is
replicated on the ranks whose query heads use it. Norms and rotary tables are replicated.

The model never talks to torch.distributed itself: it calls `TensorParallel.all_reduce` and
`gather_vocab`, which the engine fills in (dashchat/distributed/group.py). At size 1 both are
identities and every layer is exactly the single-device one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in the tensor-parallel group and the two collectives the model needs."""

    rank: int = 0
    size: int = 1
    all_reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity, compare=False)
    # [N, vocab / size] on every rank -> [N, padded vocab] (valid on rank 0, which samples)
    gather_vocab: Callable[[torch.Tensor], torch.Tensor] = field(default=_identity, compare=False)


SINGLE = TensorParallel()


def valid_sizes(cfg: ModelConfig, limit: int = 64) -> list[int]:
    return [n for n in range(1, limit + 1) if not _misfits(cfg, n)]


def _misfits(cfg: ModelConfig, size: int) -> list[str]:
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        problems.append(f"{cfg.num_kv_heads} KV heads (nor is {size} a multiple of {cfg.num_kv_heads})")
    if cfg.intermediate_size % size:
        problems.append(f"an MLP width of {cfg.intermediate_size}")
    if cfg.moe is not None:  # every rank holds a slice of every expert
        for what, width in (("an expert width", cfg.moe.intermediate_size),
                            ("a shared-expert width", cfg.moe.shared_intermediate_size)):
            if width % size:
                problems.append(f"{what} of {width}")
    return problems


def check_tensor_parallel(cfg: ModelConfig, size: int) -> None:
    """Refuse a size the model's shapes do not divide into, naming the numbers and what would work."""
    if size < 1:
        raise ValueError(f"tensor-parallel size must be at least 1, got {size}")
    problems = _misfits(cfg, size)
    if problems:
        works = ", ".join(map(str, valid_sizes(cfg, limit=max(cfg.num_heads, size))))
        raise ValueError(
            f"this model cannot be split over {size} ranks: {size} does not divide {' or '.join(problems)}. "
            f"Tensor-parallel sizes that work for it: {works}"
        )


@dataclass(frozen=True)
class ShardPlan:
    """Local sizes and the slice of each full weight that rank `tp.rank` of `tp.size` holds."""

    cfg: ModelConfig
    rank: int
    size: int

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.size)

    @property
    def intermediate_size(self) -> int:
        return self.cfg.intermediate_size // self.size

    def mlp_width(self, kind: str) -> int:
        """This rank's width of the dense MLP ("mlp"), of each expert ("expert") or of the shared
        expert ("shared")."""
        if kind == "mlp":
            return self.intermediate_size
        moe = self.cfg.moe
        return (moe.intermediate_size if kind == "expert" else moe.shared_intermediate_size) // self.size

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.cfg.vocab_size // self.size)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab_per_rank

    def kv_head_start(self) -> int:
        # With fewer KV heads than ranks, rank r serves query heads that all map to KV head
        # r * kv // size (query head h uses KV head h // (heads / kv)).
        if self.cfg.num_kv_heads >= self.size:
            return self.rank * self.num_kv_heads
        return self.rank * self.cfg.num_kv_heads // self.size

    def rows(self, kind: str) -> tuple[int, int]:
        """(start, length) along the split axis of a full tensor of this kind."""
        d = self.cfg.head_dim
        if kind == "q":
            return self.rank * self.num_heads * d, self.num_heads * d
        if kind == "kv":
            return self.kv_head_start() * d, self.num_kv_heads * d
        if kind in ("mlp", "expert", "shared"):
            width = self.mlp_width(kind)
            return self.rank * width, width
        if kind == "vocab":
            start = min(self.vocab_start, self.cfg.vocab_size)
            return start, min(self.cfg.vocab_size, start + self.vocab_per_rank) - start
        raise ValueError(kind)


def read_slice(source, kind: str | None, dim: int, plan: ShardPlan) -> torch.Tensor:
    """The part of a checkpoint tensor this rank holds. `source` is a tensor or a safetensors slice
    (read lazily: only the rank's rows come off the disk)."""
    if kind is None or plan.size == 1:
        return source[...] if not isinstance(source, torch.Tensor) else source
    start, length = plan.rows(kind)
    index = (slice(start, start + length),) if dim == 0 else (slice(None), slice(start, start + length))
    return source[index]


class VocabParallelEmbedding(nn.Module):
    """An embedding whose rows (the vocabulary) are split over the ranks: each rank looks up the
    ids it owns, zeros the others, and a sum over ranks gives every rank the full result."""

    def __init__(self, vocab_size: int, hidden: int, tp: TensorParallel = SINGLE, vocab_start: int = 0) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_start = vocab_start
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))
