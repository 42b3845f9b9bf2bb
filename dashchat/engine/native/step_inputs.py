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
_HEADER = 8  # cmd, tokens, decodes, table width, prefill spans, span table total, logits rows, spare


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [N] long: decodes first, then the prefill chunks
    positions: torch.Tensor  # [N] long
    slots: torch.Tensor  # [N] long: KV cache slot of each token
    decode_tables: torch.Tensor | None  # [D, W] long, block tables of the decodes (None: no decodes)
    decode_lens: torch.Tensor | None  # [D] long, context length including the new token
    spans: list[PrefillSpan]
    logits_rows: list[int]  # flat-batch rows whose logits are sampled

    @property
    def num_decodes(self) -> int:
        return 0 if self.decode_lens is None else len(self.decode_lens)


def send_step(group, step: StepInputs) -> None:
    """Rank 0: broadcast the step to the other ranks."""
    dev = step.input_ids.device
    d = step.num_decodes
    width = 0 if step.decode_tables is None else step.decode_tables.shape[1]
    table_total = sum(len(s.block_table) for s in step.spans)
    header = torch.tensor(
        [STEP, len(step.input_ids), d, width, len(step.spans), table_total, len(step.logits_rows), 0],
        dtype=torch.long, device=dev,
    )
    meta = [v for s in step.spans for v in (s.start, s.length, s.context_len, len(s.block_table))]
    parts = [step.input_ids, step.positions, step.slots]
    if d:
        parts += [step.decode_tables.reshape(-1), step.decode_lens]
    parts.append(torch.tensor(meta + step.logits_rows, dtype=torch.long, device=dev))
    parts += [s.block_table for s in step.spans]
    group.broadcast(header)
    group.broadcast(torch.cat(parts))


def send_command(group, command: int, device: torch.device) -> None:
    """Rank 0: a step-less message (stop, or a heartbeat that keeps idle ranks' timeouts away)."""
    group.broadcast(torch.tensor([command] + [0] * (_HEADER - 1), dtype=torch.long, device=device))


def receive_step(group, device: torch.device) -> StepInputs | int:
    """Other ranks: the next step, or a command (STOP / HEARTBEAT)."""
    header = group.broadcast(torch.empty(_HEADER, dtype=torch.long, device=device)).tolist()
    cmd, n, d, width, n_spans, table_total, n_rows, _ = header
    if cmd != STEP:
        return cmd
    body = torch.empty(3 * n + d * width + d + 4 * n_spans + n_rows + table_total, dtype=torch.long, device=device)
    group.broadcast(body)
    input_ids, positions, slots = body[:n], body[n : 2 * n], body[2 * n : 3 * n]
    at = 3 * n
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
    return StepInputs(input_ids, positions, slots, tables, lens, spans, small[4 * n_spans :])
