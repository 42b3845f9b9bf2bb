"""Attention over the paged KV cache for one flat step batch (decodes first, then prefill chunks).

Grouped-query attention without copying K/V per query head: the query heads that
share a KV head are folded into the query-length axis, so one SDPA call serves the group.

Sliding-window layers (Gemma 3's five in six, Phi-3-mini-4k's all) keep the whole context in the
cache like the others; masks (and the C decode kernel's first key) limit them to their window.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..cpu.kernels import kernel_library, paged_decode_attention, paged_decode_attention_op

_PREFILL_TILE = 64  # query positions per tile on CPU (measured best of 64/128/256 at 128-1024 tokens)
# Largest score matrix (query heads per KV head x queries x keys) that one batched prefill call may
# build with its mask; bigger steps (long cached contexts) take one call per chunk.
_MAX_BATCHED_SCORES = 1 << 26


@dataclass
class PrefillSpan:
    start: int  # first token in the flat batch
    length: int  # tokens computed this step
    context_len: int  # tokens of context after this step (cached prefix + this chunk)
    block_table: torch.Tensor  # [num_blocks] long


@dataclass
class StepAttentionMetadata:
    slot_mapping: torch.Tensor  # [N] long: cache slot of each token's K/V
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [D, max_blocks] long
    decode_context_lens: torch.Tensor | None  # [D] long, including the new token
    prefills: list[PrefillSpan]


class PagedAttention:
    """Per-step callable handed to the model: writes this step's K/V, attends over the cache."""

    def __init__(
        self, kv_cache: list[tuple[torch.Tensor, torch.Tensor]], block_size: int, scale: float,
        batch_prefills: bool | None = None, windows: list[int | None] | None = None,
    ) -> None:
        self.kv_cache = kv_cache  # per layer: (k, v), each [num_blocks * block_size, Hkv, D]
        self.block_size = block_size
        self.scale = scale
        # per layer: how many keys (the query's own included) a query sees; None: all before it
        self.windows = windows or [None] * len(kv_cache)
        # On a GPU every prefill chunk of a step goes into one attention call: one call per chunk
        # and layer cost more in launches than the attention itself (16 chunks of 128 tokens took
        # ~350 ms a step on an H200). On CPU the tiled per-chunk path skips the masked work.
        if batch_prefills is None:
            batch_prefills = bool(kv_cache) and kv_cache[0][0].is_cuda
        self.batch_prefills = batch_prefills
        # float32 on CPU: decode attention in C, straight from the paged cache
        self.decode_kernel = (bool(kv_cache) and kv_cache[0][0].device.type == "cpu"
                              and kv_cache[0][0].dtype == torch.float32 and kernel_library() is not None)
        self.meta: StepAttentionMetadata | None = None
        self._decode_masks: dict[int | None, torch.Tensor] = {}  # per window
        # this step's batched prefill per window: (key slots or None, mask), False for one call per chunk
        self._prefill_plans: dict[int | None, tuple[torch.Tensor | None, torch.Tensor] | bool] = {}
        self._triangle: torch.Tensor | None = None

    def begin_step(self, meta: StepAttentionMetadata) -> None:
        self.meta = meta
        self._decode_masks = {}
        self._prefill_plans = {}

    def _decode_mask(self, window: int | None) -> torch.Tensor:
        """[D, 1, 1, L]: True where the key is inside the sequence (and the window). Built at the
        step's first layer of each window, shared by the rest."""
        mask = self._decode_masks.get(window)
        if mask is None:
            meta = self.meta
            positions = torch.arange(self._decode_span(), device=meta.slot_mapping.device)
            lens = meta.decode_context_lens[:, None]
            mask = positions < lens
            if window is not None:
                mask &= positions >= lens - window
            mask = self._decode_masks[window] = mask[:, None, None, :]
        return mask

    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        meta = self.meta
        k_cache, v_cache = self.kv_cache[layer_idx]
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        num_heads, head_dim = q.shape[1], q.shape[2]
        out = torch.empty(q.shape[0], num_heads * head_dim, dtype=q.dtype, device=q.device)
        d = meta.num_decodes
        window = self.windows[layer_idx]
        if d:
            out[:d] = self._decode(q[:d], k_cache, v_cache, window)
        if meta.prefills and self.batch_prefills:
            plan = self._prefill_plans.get(window)
            if plan is None:  # decided at the step's first layer of this window, shared by the rest
                group = num_heads // k_cache.shape[1]
                plan = self._plan_prefill(q.device, group, window) if self._fits_one_call(group) else False
                self._prefill_plans[window] = plan
            if plan:
                out[d:] = self._prefill_batched(plan, q[d:], k[d:], v[d:], k_cache, v_cache)
                return out
        for span in meta.prefills:
            rows = slice(span.start, span.start + span.length)
            out[rows] = self._prefill(span, q[rows], k[rows], v[rows], k_cache, v_cache, window)
        return out

    def _decode_span(self) -> int:
        """Keys the decodes attend over: the padded block tables' width (masked past each length)."""
        return self.meta.decode_block_tables.shape[1] * self.block_size

    def _gather(self, cache: torch.Tensor, block_tables: torch.Tensor, length: int) -> torch.Tensor:
        """[..., num_blocks] block ids -> [..., Hkv, length, D] keys or values."""
        bs = self.block_size
        n_blocks = -(-length // bs)
        paged = cache.view(-1, bs, cache.shape[1], cache.shape[2])
        ids = block_tables[..., :n_blocks]
        # index_select, not paged[ids]: advanced indexing is ~20x slower here on CPU.
        x = paged.index_select(0, ids.reshape(-1)).view(*ids.shape, bs, cache.shape[1], cache.shape[2])
        x = x.flatten(-4, -3)[..., :length, :, :]  # [..., L, H, D]
        return x.transpose(-3, -2)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None
                ) -> torch.Tensor:  # fmt: skip
        meta = self.meta
        if self.decode_kernel:  # reads only the keys in the window
            op = paged_decode_attention_op if torch.compiler.is_compiling() else paged_decode_attention
            return op(q, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens, self.block_size,
                      self.scale, window or 0)
        n, hq, dim = q.shape
        hkv = k_cache.shape[1]
        keys = self._gather(k_cache, meta.decode_block_tables, self._decode_span())  # [D, Hkv, L, dim]
        values = self._gather(v_cache, meta.decode_block_tables, self._decode_span())
        qg = q.view(n, hkv, hq // hkv, dim)  # the group's query heads act as query positions
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=self._decode_mask(window), scale=self.scale)
        return o.reshape(n, hq * dim)

    def _prefill(
        self, span: PrefillSpan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor, window: int | None,
    ) -> torch.Tensor:
        past = span.context_len - span.length
        if past == 0:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:
            keys = self._gather(k_cache, span.block_table, span.context_len)
            values = self._gather(v_cache, span.block_table, span.context_len)
        if q.device.type == "cpu":
            return self._prefill_tiled(q, keys, values, past, window)
        group = q.shape[1] // keys.shape[0]
        q_pos = torch.arange(past, span.context_len, device=q.device)
        k_pos = torch.arange(span.context_len, device=q.device)
        mask = _visible(q_pos, k_pos, window).repeat(group, 1)  # [group * T, L]
        return self._grouped_sdpa(q, keys, values, mask)

    def _grouped_sdpa(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q [T, Hq, dim], keys/values [Hkv, L, dim], mask [group * T, L] (rows ordered (group member,
        position)) -> [T, Hq * dim] with heads ordered (kv head, group member)."""
        t, hq, dim = q.shape
        hkv = keys.shape[0]
        group = hq // hkv
        qg = q.view(t, hkv, group, dim).permute(1, 2, 0, 3).reshape(hkv, group * t, dim)
        o = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask, scale=self.scale)
        return o.view(hkv, group, t, dim).permute(2, 0, 1, 3).reshape(t, hq * dim)

    def _fits_one_call(self, group: int) -> bool:
        spans = self.meta.prefills
        queries = sum(s.length for s in spans)
        cached = any(s.context_len > s.length for s in spans)
        keys = sum(s.context_len for s in spans) if cached else queries
        # the chunks fill the batch's rows after the decodes, in order: true of ModelRunner's batches
        in_order = all(a.start + a.length == b.start for a, b in zip(spans, spans[1:]))
        return in_order and group * queries * keys <= _MAX_BATCHED_SCORES

    def _plan_prefill(self, device: torch.device, group: int, window: int | None
                      ) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
        """Key slots to gather (None: the chunks' own K/V are all the keys) and the mask
        [group * T, L]: a query sees the keys of its own sequence up to its position."""
        spans, bs = self.meta.prefills, self.block_size
        gather = any(s.context_len > s.length for s in spans)
        q_pos: list[int] = []
        q_seq: list[int] = []
        k_pos: list[int] = []
        k_seq: list[int] = []
        slots = []
        for i, s in enumerate(spans):
            past = s.context_len - s.length
            first_key = 0 if gather else past
            q_pos += range(past, s.context_len)
            q_seq += [i] * s.length
            k_pos += range(first_key, s.context_len)
            k_seq += [i] * (s.context_len - first_key)
            if gather:
                positions = torch.arange(s.context_len, device=device)
                slots.append(s.block_table[positions // bs] * bs + positions % bs)
        qp, qs, kp, ks = (torch.tensor(x, device=device) for x in (q_pos, q_seq, k_pos, k_seq))
        mask = (qs[:, None] == ks[None, :]) & _visible(qp, kp, window)
        return (torch.cat(slots) if gather else None), mask.repeat(group, 1)

    def _prefill_batched(
        self, plan: tuple[torch.Tensor | None, torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Every prefill chunk of the step in one masked SDPA call. q/k/v: [T, H, D], the chunks' rows."""
        slots, mask = plan
        if slots is None:
            keys, values = k.transpose(0, 1), v.transpose(0, 1)
        else:
            keys = k_cache.index_select(0, slots).transpose(0, 1)
            values = v_cache.index_select(0, slots).transpose(0, 1)
        return self._grouped_sdpa(q, keys, values, mask)

    def _upper_triangle(self, n: int, device: torch.device) -> torch.Tensor:
        """[n, n] bool, True above the diagonal (key after query); n <= _PREFILL_TILE."""
        if self._triangle is None or self._triangle.device != device:
            tile = torch.ones(_PREFILL_TILE, _PREFILL_TILE, dtype=torch.bool, device=device)
            self._triangle = torch.triu(tile, diagonal=1)
        return self._triangle[:n, :n]

    def _prefill_tiled(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, past: int,
                       window: int | None = None) -> torch.Tensor:
        """Causal attention in tiles of queries, each against only the keys it can see.

        On CPU, SDPA with a mask computes every masked score and ran at ~40 GFLOP/s here; two
        batched matmuls per tile skip the upper triangle: 4x faster at 512 tokens, ~5x at 1024.
        keys/values: [Hkv, past + T, dim].
        """
        t, hq, dim = q.shape
        hkv = keys.shape[0]
        group = hq // hkv
        qg = (q * self.scale).view(t, hkv, group, dim).transpose(0, 1)  # [Hkv, T, group, dim]
        out = torch.empty(t, hkv, group, dim, dtype=q.dtype, device=q.device)
        # contiguous [Hkv, L, dim] (the cache's rows interleave the heads): the products' faster path
        keys, values = keys.contiguous(), values.contiguous()
        for start in range(0, t, _PREFILL_TILE):
            end = min(t, start + _PREFILL_TILE)
            seen = past + end  # keys visible to the tile's last query
            # a window hides the keys older than the one its first query still sees
            first = 0 if window is None else max(0, past + start - window + 1)
            rows = qg[:, start:end].reshape(hkv, (end - start) * group, dim)  # ordered (position, member)
            scores = torch.bmm(rows, keys[:, first:seen].transpose(1, 2))
            n = end - start
            if window is None:
                # only the tile's own diagonal block holds keys some of its queries must not see:
                # its strict upper triangle, the same for every tile and layer
                diagonal = scores.view(hkv, n, group, seen)[..., past + start :]
                diagonal.masked_fill_(self._upper_triangle(n, q.device)[:, None, :], float("-inf"))
            else:
                q_pos = torch.arange(past + start, past + end, device=q.device)
                hidden = ~_visible(q_pos, torch.arange(first, seen, device=q.device), window)
                scores.view(hkv, n, group, seen - first).masked_fill_(hidden[:, None, :], float("-inf"))
            o = torch.bmm(torch.softmax(scores, dim=-1), values[:, first:seen])
            out[start:end] = o.view(hkv, end - start, group, dim).transpose(0, 1)
        return out.reshape(t, hq * dim)


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Q, K] bool: a query sees the keys at or before its position, and within its window."""
    seen = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        seen &= k_pos[None, :] > q_pos[:, None] - window
    return seen
