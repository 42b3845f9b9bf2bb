"""Continuous batching: which sequences run this step, and how many tokens each.

Every step (1) gives each decoding sequence one token, preempting the newest
sequences when KV blocks run out, then (2) spends the rest of the token budget on
prefill chunks, continuing sequences first, then admitting waiting ones in arrival
order. A long prompt is thus split over several steps and never freezes running streams.
With speculative decoding, (1b) decoding sequences get proposed next tokens to verify, as many
as the step's rows allow and free blocks hold (proposals never preempt anyone).
Preempted sequences drop their blocks and are recomputed later (prefix caching
makes that cheap); none is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SeqStatus
from .speculative import Speculator


@dataclass
class ScheduledBatch:
    decodes: list[Sequence]  # 1 + len(seq.proposal) tokens each, listed first in the flat batch
    prefills: list[tuple[Sequence, int]]  # (sequence, tokens computed this step)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 speculator: Speculator | None = None) -> None:
        self.blocks = blocks
        self.speculator = speculator
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.running) or any(s.blocked_on is None for s in self.waiting)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_seq(seq)
        if self.speculator is not None:
            self.speculator.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        decodes: list[Sequence] = []
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.is_prefilling:
                continue
            # The newest running sequence gives up its blocks until this one fits.
            while not self.blocks.allocate(seq, seq.num_tokens):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                decodes.append(seq)
                budget -= 1
        budget -= self._propose(decodes)

        prefills: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.is_prefilling and seq not in decodes:
                chunk = self._fit_chunk(seq, budget)
                if chunk:
                    prefills.append((seq, chunk))
                    budget -= chunk

        while budget > 0 and self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.blocked_on is not None:
                break  # keep arrival order: its parent's prefill finishes first
            if not seq.block_table and not (seq.pooling is not None and seq.pooling.needs_every_position):
                seq.num_computed_tokens = seq.num_cached_tokens = self.blocks.reuse_cached_prefix(seq)
            chunk = self._fit_chunk(seq, budget)
            if not chunk:
                self.blocks.free_seq(seq)
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            prefills.append((seq, chunk))
            budget -= chunk
        return ScheduledBatch(decodes, prefills)

    def _propose(self, decodes: list[Sequence]) -> int:
        """Attach this step's proposals to the decodes; returns the rows they add."""
        for seq in decodes:
            seq.proposal = []
        if self.speculator is None:
            return 0
        added = 0
        for seq, proposal in self.speculator.plan(decodes):
            if self.blocks.allocate(seq, seq.num_tokens + len(proposal)):
                seq.proposal = proposal
                added += len(proposal)
        return added

    def _fit_chunk(self, seq: Sequence, budget: int) -> int:
        """Largest prefill chunk within budget whose blocks can be had (0 if none)."""
        chunk = min(seq.num_tokens - seq.num_computed_tokens, budget)
        while chunk > 0 and not self.blocks.allocate(seq, seq.num_computed_tokens + chunk):
            # Shrink to what the free blocks hold.
            room = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size - seq.num_computed_tokens
            chunk = min(chunk - 1, room)
        return max(chunk, 0)

    def finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SeqStatus.FINISHED:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_seq(seq)
        if self.speculator is not None:
            self.speculator.release(seq, finished=True)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        for other in self.waiting:  # children waiting on a parent that ends early start now
            if other.blocked_on is seq:
                other.blocked_on = None
