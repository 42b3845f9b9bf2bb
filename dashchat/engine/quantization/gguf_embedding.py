"""The token embedding over a GGUF file's own blocks: a lookup dequantizes only the rows it reads.

Qwen2.5-0.5B's float32 table is 151936 x 896 = 544 MB; its Q8_0 blocks are 145 MB, and a model with
tied embeddings shares them with its output head (one copy, two modules). Under tensor parallelism a
rank holds its vocabulary rows, as `VocabParallelEmbedding` does, and the masked lookups are summed.
"""

from __future__ import annotations

import itertools
import weakref

import torch
from torch import nn

from ...models.parallel import SINGLE, TensorParallel
from ..cpu.kernels import kernel_library
from .gguf import BLOCK_TYPES, ROWS8_LAYOUT, interleave_rows

_embeddings: weakref.WeakValueDictionary[int, "GGUFEmbedding"] = weakref.WeakValueDictionary()
_handles = itertools.count()


@torch.library.custom_op("dashchat::gguf_embedding", mutates_args=())
def gguf_embedding(ids: torch.Tensor, handle: int, hidden: int) -> torch.Tensor:
    return _embeddings[handle].rows(ids)


@gguf_embedding.register_fake
def _gguf_embedding_shape(ids: torch.Tensor, handle: int, hidden: int) -> torch.Tensor:
    return ids.new_empty(ids.shape[0], hidden, dtype=torch.float32)


class GGUFEmbedding(nn.Module):
    """Embedding rows [vocab_start, vocab_start + rows) held as raw GGUF blocks [rows, row_bytes].

    interleave=True (a table a tied head shares, of a type in INTERLEAVED_TYPES): the rows are
    rearranged in groups of 8 like a GGUFPart's, so the head's products (a whole vocabulary of rows
    every step) read them as a decode kernel streams them; a lookup unpacks the few groups it reads."""

    def __init__(self, type_name: str, blocks: torch.Tensor, hidden: int, tp: TensorParallel = SINGLE,
                 vocab_start: int = 0, interleave: bool = False) -> None:
        super().__init__()
        type_id, per_block, block_bytes = BLOCK_TYPES[type_name]
        if hidden % per_block or blocks.dtype != torch.uint8 or blocks.shape[1] != hidden // per_block * block_bytes:
            raise ValueError(f"{type_name} rows of {hidden} values do not fit {tuple(blocks.shape)} bytes")
        self.type_name, self.type_id = type_name, type_id
        self.hidden = hidden
        self.tp, self.vocab_start = tp, vocab_start
        self.register_buffer("blocks", blocks.contiguous(), persistent=False)
        self._lib = kernel_library()
        if self._lib is None:
            raise RuntimeError("GGUF embeddings need dashchat's C kernels (a C compiler); use --quantization none")
        if interleave:
            self.type_id = interleave_rows(type_name, self.blocks, hidden)
        self.handle = next(_handles)
        _embeddings[self.handle] = self

    @property
    def num_rows(self) -> int:
        return self.blocks.shape[0]

    @property
    def interleaved(self) -> bool:
        return bool(self.type_id & ROWS8_LAYOUT)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, hidden={self.hidden}, type={self.type_name}, vocab_start={self.vocab_start}"

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """float32 [len(ids), hidden] for local row ids (all in range)."""
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(ids.shape[0], self.hidden)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_rows):
            raise IndexError(f"embedding row out of range 0..{self.num_rows - 1}")
        if self._lib.dc_gguf_dequantize_rows(self.type_id, self.blocks.data_ptr(), self.num_rows, ids.data_ptr(),
                                             ids.shape[0], self.hidden, out.data_ptr()):
            raise ValueError(f"GGUF kernel rejected a type-{self.type_id} embedding of width {self.hidden}")
        return out

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return gguf_embedding(ids, self.handle, self.hidden)
        return self.rows(ids)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_rows)
        out = self._lookup(local.masked_fill(outside, 0))
        return self.tp.all_reduce(out.masked_fill(outside[:, None], 0))
