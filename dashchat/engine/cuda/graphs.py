"""Decode steps on fixed, bucketed shapes, replayed from captured CUDA graphs on a GPU.

An eager decode step of a small model launches hundreds of tiny kernels and the GPU waits on
Python between them (a 135M model ran ~14 ms per step whatever the batch size). A CUDA graph
replays the whole step with one launch. Graphs need fixed shapes and addresses, so inputs are
copied into static buffers padded to a bucket: the batch to a power of two, the block-table width
to a power of two. Padded rows write their K/V into a scratch block that no sequence owns and
their logits are dropped. Graphs are captured on first use of a bucket and share one memory pool,
which is safe because each step's logits are consumed before the next replay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

DecodeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, but never above cap (cap itself is a bucket)."""
    return min(1 << max(0, n - 1).bit_length(), cap)


class PaddedDecode:
    """Runs `fn(input_ids, positions, slots, block_tables, context_lens)` on bucketed shapes.

    With `use_graphs` each bucket is captured once as a CUDA graph and replayed; without, the
    function runs eagerly on the padded inputs (the same shapes, used to check the padding on CPU).
    """

    def __init__(
        self, fn: DecodeFn, device: torch.device, max_batch: int, max_width: int,
        scratch_block: int, block_size: int, use_graphs: bool,
    ) -> None:
        self.fn = fn
        self.max_batch = max_batch
        self.max_width = max(2, max_width)
        self.scratch_block = scratch_block
        self.scratch_slot = scratch_block * block_size
        self.use_graphs = use_graphs
        # Inference tensors, as the step's own inputs are: a compiled step guards on the difference.
        with torch.inference_mode():
            long = dict(dtype=torch.long, device=device)
            self.input_ids = torch.zeros(max_batch, **long)
            self.positions = torch.zeros(max_batch, **long)
            self.slots = torch.full((max_batch,), self.scratch_slot, **long)
            # flat, so that every (batch, width) bucket views a contiguous prefix of it
            self._tables = torch.full((max_batch * self.max_width,), scratch_block, **long)
            self.context_lens = torch.ones(max_batch, **long)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if use_graphs else None

    def _views(self, b: int, w: int) -> tuple[torch.Tensor, ...]:
        return (self.input_ids[:b], self.positions[:b], self.slots[:b], self._tables[: b * w].view(b, w),
                self.context_lens[:b])

    def __call__(
        self, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        block_tables: torch.Tensor, context_lens: torch.Tensor,
    ) -> torch.Tensor:
        n, w = block_tables.shape
        b, wb = bucket(n, self.max_batch), bucket(w, self.max_width)
        if self.use_graphs and (b, wb) not in self.graphs:
            self._capture(b, wb)
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slots[:n].copy_(slots)
        self.context_lens[:n].copy_(context_lens)
        tables = self._tables[: b * wb].view(b, wb)
        tables.fill_(self.scratch_block)  # columns past w are masked by the lengths
        tables[:n, :w].copy_(block_tables)
        self._reset_padding(n, b)
        if not self.use_graphs:
            return self.fn(*self._views(b, wb))[:n]
        graph, logits = self.graphs[(b, wb)]
        graph.replay()
        return logits[:n]

    def _reset_padding(self, n: int, b: int) -> None:
        """Rows n..b: token 0 at position 0, K/V into the scratch block, one key of context."""
        if b > n:
            self.input_ids[n:b].zero_()
            self.positions[n:b].zero_()
            self.slots[n:b].fill_(self.scratch_slot)
            self.context_lens[n:b].fill_(1)

    def _capture(self, b: int, w: int) -> None:
        """Capture on all-padding inputs: the warm-up and capture runs touch only the scratch block."""
        start = time.perf_counter()
        self._reset_padding(0, b)
        self._tables[: b * w].fill_(self.scratch_block)
        args = self._views(b, w)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # kernels' lazy init and autotuning happen outside the capture
            self.fn(*args)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self.fn(*args)
        self.graphs[(b, w)] = (graph, logits)
        log.info("captured the decode step for batch %d, table width %d in %.0f ms",
                 b, w, 1000 * (time.perf_counter() - start))
