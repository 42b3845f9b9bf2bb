"""One generated sequence (a choice of a request) and its bookkeeping."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from ..types import LogitsProcessor, SamplingParams, TokenLogprob


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # not yet (or no longer, after preemption) holding KV blocks
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str  # the engine keeps the request; a sequence only names it
    index: int  # choice index within the request
    token_ids: list[int]  # prompt + generated
    num_prompt_tokens: int
    params: SamplingParams
    arrival: float
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of the prompt, found in the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    finish_reported: bool = False
    generator: torch.Generator | None = None
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    # Waits for its parent's prefill (n > 1) so the prompt's KV comes from the prefix cache.
    blocked_on: "Sequence | None" = None
    # Not yet reported to the client.
    pending_token_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # Speculative decoding: this step's proposed next tokens, and the proposer's state (speculative.py).
    proposal: list[int] = field(default_factory=list)
    spec: Any = None
    # Vision models: the prompt's M-RoPE position ids [3, prompt length] (None: a position is the
    # token's index), the delta a later token adds to its index, and the embeddings of the images
    # (by index in params.images) computed for a prefill, kept until their span's KV is written.
    mrope_positions: torch.Tensor | None = None
    mrope_delta: int = 0
    image_embeds: dict[int, torch.Tensor] = field(default_factory=dict)
    # A pooling request (pooling.PoolState): prefill only, finished by the step that computes its end.
    pooling: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still lacks KV (prompt, or everything after a preemption). A
        pooling sequence prefills to its end: it never takes a decode row."""
        return self.num_tokens - self.num_computed_tokens > (0 if self.pooling is not None else 1)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
