"""Pooling requests in the native engine: what a prefill-only sequence keeps of its hidden states.

A pooling sequence is scheduled like any prompt (chunked prefill, the prefix cache, preemption)
but never decodes: the step that computes its last position finishes it. Each step hands it the
final hidden states of its chunk's rows; it keeps only what its pooling needs (a running sum for
mean pooling, the first row for CLS, the last row for last-token pooling), so a long prompt never
holds all its hidden states. Mean and CLS pooling need every position computed, so such a
sequence takes nothing from the prefix cache (last-token pooling does: its last position is
always computed).
"""

from __future__ import annotations

import torch

from ..types import PoolingParams


class PoolState:
    def __init__(self, params: PoolingParams) -> None:
        self.params = params
        self.total: torch.Tensor | None = None  # mean: sum of the rows so far
        self.first: torch.Tensor | None = None  # cls
        self.last: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None  # at the last position, for params.logit_token_ids

    @property
    def needs_every_position(self) -> bool:
        return self.params.pooling in ("mean", "cls")

    @property
    def wants_logits(self) -> bool:
        return bool(self.params.logit_token_ids)

    def add(self, rows: torch.Tensor, start: int, end: int, num_tokens: int) -> None:
        """The hidden states [end - start, hidden] of positions start..end-1 of this step's chunk.
        A chunk from position 0 starts over (the sequence was preempted and is recomputed)."""
        kind = self.params.pooling
        if kind == "mean":
            part = rows.float().sum(0)
            self.total = part if start == 0 or self.total is None else self.total + part
        elif kind == "cls" and start == 0:
            self.first = rows[0].float()
        if end == num_tokens:
            self.last = rows[-1].float()

    def result(self, num_tokens: int) -> torch.Tensor:
        kind = self.params.pooling
        if kind == "mean":
            vec = self.total / num_tokens
        elif kind == "cls":
            vec = self.first
        else:
            vec = self.last
        return vec.cpu()


def collect(prefills, spans, hidden: torch.Tensor) -> None:
    """After a forward: hand each pooling sequence of the step the rows of its chunk."""
    for (seq, chunk), span in zip(prefills, spans):
        if seq.pooling is not None:
            start = seq.num_computed_tokens
            seq.pooling.add(hidden[span.start : span.start + chunk], start, start + chunk, seq.num_tokens)


def take_logits(decodes, finishing, logits: torch.Tensor) -> torch.Tensor:
    """Split a step's logits: rows of pooling sequences that asked for logits go to them (their
    tokens' values); the rest, the rows the sampler reads, are returned. Rows are in batch order:
    the decodes' (1 + proposals each), then one per prefill that reached its last position and
    samples or asked for logits."""
    row = sum(1 + len(s.proposal) for s in decodes)
    keep = list(range(row))
    for seq in finishing:
        if seq.pooling is None:
            keep.append(row)
        elif seq.pooling.wants_logits:
            ids = torch.tensor(seq.pooling.params.logit_token_ids, dtype=torch.long, device=logits.device)
            seq.pooling.logits = logits[row, ids].float().cpu()
        else:
            continue
        row += 1
    return logits if len(keep) == row else logits[keep]
