"""One step's model inputs as tensors, and their trip from rank 0 to the other tensor-parallel ranks.

Rank 0 schedules and builds the inputs; the other ranks run the same forward on them. They travel
as two broadcasts of int64 tensors (a fixed header, then one flat body), never as pickled Python
objects: a step costs two small collectives whatever the batch holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .attention import PrefillSpan

# Header commands.
STOP, STEP, HEARTBEAT = 0, 1, 2
_HEADER = 8  # cmd, tokens, decodes, table width, prefill spans, span table total, logits rows, images
# The last header slot: 2 x image embedding rows + 1 where positions have three rows (M-RoPE).


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [N] long: decodes first, then the prefill chunks
    positions: torch.Tensor  # [N] long, or [3, N] (M-RoPE: t, h, w) in a step that prefills image tokens
    slots: torch.Tensor  # [N] long: KV cache slot of each token
    decode_tables: torch.Tensor | None  # [D, W] long, block tables of the decodes (None: no decodes)
    decode_lens: torch.Tensor | None  # [D] long, context length including the new token
    spans: list[PrefillSpan]
    logits_rows: list[int]  # flat-batch rows whose logits are sampled
    # Image embeddings that replace the token embeddings of these flat-batch rows (None: no images).
    mm_rows: torch.Tensor | None = None  # [M] long
    mm_embeds: torch.Tensor | None = None  # [M, hidden]

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_lens is None else len(self.decode_lens)


def send_step(group, step: StepInputs) -> None:
    """Rank 0: broadcast the step to the other ranks."""
    dev = step.input_ids.device
    d = step.num_decodes
    width = 0 if step.decode_tables is None else step.decode_tables.shape[1]
    table_total = sum(len(s.block_table) for s in step.spans)
    images = 0 if step.mm_rows is None else len(step.mm_rows)
    header = torch.tensor(
        [STEP, len(step.input_ids), d, width, len(step.spans), table_total, len(step.logits_rows),
         2 * images + (step.positions.dim() == 2)],
        dtype=torch.long, device=dev,
    )
    meta = [v for s in step.spans for v in (s.start, s.length, s.context_len, len(s.block_table))]
    parts = [step.input_ids, step.positions.reshape(-1), step.slots]
    if d:
        parts += [step.decode_tables.reshape(-1), step.decode_lens]
    parts.append(torch.tensor(meta + step.logits_rows, dtype=torch.long, device=dev))
    parts += [s.block_table for s in step.spans]
    if images:
        parts.append(step.mm_rows)
    group.broadcast(header)
    group.broadcast(torch.cat(parts))
    if images:  # the vision tower runs on rank 0 only: its output travels
        group.broadcast(step.mm_embeds.contiguous())


def send_command(group, command: int, device: torch.device) -> None:
    """Rank 0: a step-less message (stop, or a heartbeat that keeps idle ranks' timeouts away)."""
    group.broadcast(torch.tensor([command] + [0] * (_HEADER - 1), dtype=torch.long, device=device))


def receive_step(group, device: torch.device, hidden: int = 0, dtype: torch.dtype = torch.float32
                 ) -> StepInputs | int:  # fmt: skip
    """Other ranks: the next step, or a command (STOP / HEARTBEAT). `hidden`/`dtype`: the shape of
    image embedding rows (vision models)."""
    header = group.broadcast(torch.empty(_HEADER, dtype=torch.long, device=device)).tolist()
    cmd, n, d, width, n_spans, table_total, n_rows, mm = header
    if cmd != STEP:
        return cmd
    images, pos_rows = mm // 2, 3 if mm % 2 else 1
    body = torch.empty((2 + pos_rows) * n + d * width + d + 4 * n_spans + n_rows + table_total + images,
                       dtype=torch.long, device=device)
    group.broadcast(body)
    input_ids = body[:n]
    positions = body[n : (1 + pos_rows) * n]
    positions = positions.view(3, n) if pos_rows == 3 else positions
    slots = body[(1 + pos_rows) * n : (2 + pos_rows) * n]
    at = (2 + pos_rows) * n
    tables = lens = None
    if d:
        tables = body[at : at + d * width].view(d, width)
        lens = body[at + d * width : at + d * width + d]
        at += d * width + d
    small = body[at : at + 4 * n_spans + n_rows].tolist()
    at += 4 * n_spans + n_rows
    spans = []
    for i in range(n_spans):
        start, length, context_len, table_len = small[4 * i : 4 * i + 4]
        spans.append(PrefillSpan(start, length, context_len, body[at : at + table_len]))
        at += table_len
    mm_rows = mm_embeds = None
    if images:
        mm_rows = body[at : at + images]
        mm_embeds = group.broadcast(torch.empty(images, hidden, dtype=dtype, device=device))
    return StepInputs(input_ids, positions, slots, tables, lens, spans, small[4 * n_spans :], mm_rows, mm_embeds)
