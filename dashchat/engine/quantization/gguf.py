"""GGUF linear layers on the CPU, run in the file's own block formats (`--quantization gguf`).

A GGUF model's linears keep the quantized blocks the file ships (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS): no float32 copy, no re-quantization. Decoding one
token then reads 4-12x fewer bytes than float32 weights. The products are the C kernels of
dashchat/engine/cpu/gguf_kernels.c: activations quantized to int8 per 32 values (llama.cpp's Q8_0
scheme; per 256 when every part is a 256-value super-block type, as its Q8_K, so a K-quant
super-block sums in integers), integer dot products. F16 and BF16 weights stay 16-bit and take float
products (bit for bit the same in every batch); gguf_loading.py holds a type without kernel as BF16 rows.
Fewer than 8 activation rows (decode steps) take per-row tiles that stream each weight group once
for all of them; whole blocks of 8 rows (prefill, big decode batches) meet each weight group in one
integer multiply-add a 4-value chunk for all 8 rows (the rows interleaved), with one float
multiply-add a group for the 8. Every batch size takes these integer products, so a token's logits
depend on what else shares its step only through float rounding (a prefix-cache hit turns a long
prefill into a short one; greedy answers must not change with it). Dequantizing into float32 for
PyTorch's GEMM was measured against the per-row tiles alone (one thread, Qwen's 4864x896 Q5_0 gate):
they were 3x faster at 16 rows, 1.4x at 64, even at 128, and 6% slower at 512 rows; the 8-row
tiles are faster still.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import weakref

import torch
from torch import nn

from ..cpu.kernels import kernel_library

log = logging.getLogger(__name__)

# type name -> (ggml type id, values per block, bytes per block), the types the kernels read. F16 and
# BF16 rows are counted in blocks of 32 values (the kernels take widths in 32-value groups).
BLOCK_TYPES = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24), "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84), "Q3_K": (11, 256, 110), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210), "IQ4_NL": (20, 32, 18), "IQ4_XS": (23, 256, 136), "F16": (1, 32, 64),
    "BF16": (30, 32, 64),
}  # fmt: skip
TYPE_IDS = {name: ids[0] for name, ids in BLOCK_TYPES.items()}
# Kept as 16-bit floats and multiplied in floats (the others: integer products of int8 activations).
FLOAT16_TYPES = frozenset({"F16", "BF16"})
# Types whose rows a GGUFPart interleaves in groups of 8 (gguf_kernels.c's ROWS8_LAYOUT): a decode
# step's one-row product then reads each group's blocks as one stream, 8 outputs at once.
INTERLEAVED_TYPES = frozenset({"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q8_0", "Q4_0", "Q5_0", "Q4_1", "Q5_1",
                               "IQ4_NL"})
ROWS8_LAYOUT = 0x100  # the type id's bit that says so


def interleave_rows(type_name: str, data: torch.Tensor, k: int) -> int:
    """Rearranges `data` (contiguous rows of k values of `type_name` as blocks) in place into
    ROWS8_LAYOUT where the type has it and the C kernels read the tensor (on CPU), and returns the type
    id the kernels are then to get: with ROWS8_LAYOUT, or the plain id where nothing was done."""
    type_id = BLOCK_TYPES[type_name][0]
    lib = kernel_library()
    if type_name not in INTERLEAVED_TYPES or lib is None or not data.is_cpu:
        return type_id
    if lib.dc_gguf_interleave(type_id, data.data_ptr(), data.shape[0], k):
        raise MemoryError(f"no memory to interleave {type_name} rows")
    return type_id | ROWS8_LAYOUT


class GGUFPart:
    """One source tensor's rows of a layer: raw blocks [rows, row_bytes] of one type. A rank's slice
    of a row-split weight keeps whole rows `k_full` values wide and reads inputs [k0, k0 + in_features)
    of them (multiples of 32: K-quant super-blocks split along their 32-value groups).

    interleave=True (for a type in INTERLEAVED_TYPES): `data` is rearranged in place into groups of 8
    rows, block by block, and `type_id` carries ROWS8_LAYOUT, which every kernel reading the part
    honours; the bytes are the same count, so memory does not grow (a row offset that is a multiple
    of 8 is the same byte offset in both layouts: the MoE kernel's chunks of an expert's rows start on
    one). interleaved=True: `data` is in that layout already (the embedding table a tied head shares,
    which GGUFEmbedding interleaved)."""

    def __init__(self, type_name: str, data: torch.Tensor, in_features: int, k_full: int | None = None,
                 k0: int = 0, interleave: bool = False, interleaved: bool = False) -> None:
        type_id, per_block, block_bytes = BLOCK_TYPES[type_name]
        k_full = in_features if k_full is None else k_full
        if (k_full % per_block or data.shape[1] != k_full // per_block * block_bytes or k0 % 32
                or in_features % 32 or k0 + in_features > k_full):
            raise ValueError(f"{type_name} rows of {k_full} values (inputs {k0}..{k0 + in_features}) do not fit "
                             f"{tuple(data.shape)} bytes")
        self.type_name, self.type_id = type_name, type_id
        self.data = data.contiguous()
        self.rows = data.shape[0]
        self.k_full, self.k0 = k_full, k0
        if interleave:
            self.type_id = interleave_rows(type_name, self.data, k_full)
        elif interleaved:
            self.type_id = type_id | ROWS8_LAYOUT

    @property
    def interleaved(self) -> bool:
        return bool(self.type_id & ROWS8_LAYOUT)


_layers: weakref.WeakValueDictionary[int, "GGUFLinear"] = weakref.WeakValueDictionary()
_handles = itertools.count()


@torch.library.custom_op("dashchat::gguf_linear", mutates_args=())
def gguf_linear(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return _layers[handle].product(x)


@gguf_linear.register_fake
def _gguf_linear_shape(x: torch.Tensor, handle: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class GGUFLinear(nn.Module):
    """nn.Linear over GGUF blocks, float32 inputs [rows, in_features] on CPU."""

    def __init__(self, in_features: int, out_features: int, parts: list[GGUFPart],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if sum(p.rows for p in parts) > out_features:
            raise ValueError("more weight rows than output features")
        self.in_features, self.out_features = in_features, out_features
        self.parts = parts
        for i, part in enumerate(parts):  # buffers, so .to()/state inspection see them
            self.register_buffer(f"blocks{i}", part.data, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
        self._filled = sum(p.rows for p in parts)
        # the parts as the kernels read them, built once (a step makes hundreds of these calls): runs
        # of integer-product parts (dc_gguf_matmul_parts) and of 16-bit ones (dc_gguf_matmul16_parts),
        # each with its first output column
        row_starts = list(itertools.accumulate((p.rows for p in parts), initial=0))
        self._runs: list[tuple[bool, int, tuple]] = []
        for float16, run in itertools.groupby(range(len(parts)), key=lambda i: parts[i].type_name in FLOAT16_TYPES):
            ids = list(run)
            self._runs.append((float16, row_starts[ids[0]],
                               self._kernel_args([parts[i] for i in ids], row_starts[ids[0] :])))
        self._quantized = any(not float16 for float16, _, _ in self._runs)
        self._lib = kernel_library()
        if self._lib is None:
            raise RuntimeError("GGUF layers need dashchat's C kernels (a C compiler); use --quantization none")
        # one activation scale a super-block where every integer-product part is a K-quant read from a
        # super-block boundary (all its runs share one quantization of the activations)
        quantized = [p for p in parts if p.type_name not in FLOAT16_TYPES]
        self._span = self._lib.dc_gguf_activation_span(
            len(quantized), (ctypes.c_int * len(quantized))(*(p.type_id for p in quantized)),
            (ctypes.c_int * len(quantized))(*(p.k0 for p in quantized)), in_features) if quantized else 32
        self.handle = next(_handles)
        _layers[self.handle] = self

    def _kernel_args(self, parts: list[GGUFPart], row_starts: list[int]) -> tuple:
        count = len(parts)
        return (
            count, (ctypes.c_int * count)(*(p.type_id for p in parts)),
            (ctypes.c_void_p * count)(*(p.data.data_ptr() for p in parts)),
            (ctypes.c_int * count)(*(p.k_full for p in parts)), (ctypes.c_int * count)(*(p.k0 for p in parts)),
            (ctypes.c_int * count)(*(p.rows for p in parts)),
            None if self.bias is None else (ctypes.c_void_p * count)(
                *(self.bias.data_ptr() + 4 * start for start in row_starts[:count])),
        )

    @property
    def nbytes(self) -> int:
        return sum(p.data.numel() for p in self.parts)

    def extra_repr(self) -> str:
        types = ",".join(p.type_name for p in self.parts)
        return f"in_features={self.in_features}, out_features={self.out_features}, types={types}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            shape = x.shape
            y = gguf_linear(x.reshape(-1, shape[-1]), self.handle, self.out_features)
            return y.reshape(*shape[:-1], self.out_features)
        return self.product(x)

    def product(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, self.in_features).float().contiguous()
        m, k, n = x.shape[0], self.in_features, self.out_features
        y = torch.empty(m, n) if self._filled == n else torch.zeros(m, n)
        lib = self._lib
        if self._quantized:
            xq, xd, xs = _activation_scratch(m * k)
            lib.dc_gguf_quantize_x(x.data_ptr(), m, k, xq, xd, xs, self._span)
        for float16, column, args in self._runs:
            out = y.data_ptr() + 4 * column
            if float16:
                status = lib.dc_gguf_matmul16_parts(*args, x.data_ptr(), out, m, k, n)
            else:
                status = lib.dc_gguf_matmul_parts(*args, xq, xd, xs, out, m, k, n, self._span)
            if status == -2:
                raise MemoryError(f"GGUF kernel: no memory for a {self.extra_repr()} product")
            if status:
                raise ValueError(f"GGUF kernel rejected a {self.extra_repr()} weight")
        return y.reshape(*shape[:-1], n)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [out_features, in_features] (zero rows past the parts): tests and float
        fallbacks."""
        n, k = self.out_features, self.in_features
        w = torch.empty(n, k)
        filled = sum(p.rows for p in self.parts)
        if filled < n:
            w[filled:].zero_()
        row = 0
        for part in self.parts:
            if part.k_full == k:
                self._lib.dc_gguf_dequantize(part.type_id, part.data.data_ptr(), 0, part.rows, part.rows, k,
                                             w[row:].data_ptr())
            else:  # a rank's input window of whole rows
                full = torch.empty(part.rows, part.k_full)
                self._lib.dc_gguf_dequantize(part.type_id, part.data.data_ptr(), 0, part.rows, part.rows, part.k_full,
                                             full.data_ptr())
                w[row : row + part.rows] = full[:, part.k0 : part.k0 + k]
            row += part.rows
        return w


_act = torch.empty(0, dtype=torch.uint8)


def _activation_scratch(values: int) -> tuple[int, int, int]:
    """Addresses of the int8 activations, their scales and their half sums, in one buffer kept
    between calls (the engine runs one product at a time; each product consumes them at once)."""
    global _act
    need = values + 4 * (values // 32) + 4 * (values // 16)
    if _act.numel() < need:
        _act = torch.empty(max(need, 2 * _act.numel()), dtype=torch.uint8)
    base = _act.data_ptr()
    return base, base + values + (-values % 4), base + values + (-values % 4) + 4 * (values // 32)


def dequantize_blocks(type_name: str, data: torch.Tensor, in_features: int) -> torch.Tensor:
    """float32 [rows, in_features] of raw blocks through the C kernel (tests, float fallbacks)."""
    part = GGUFPart(type_name, data, in_features)
    layer = GGUFLinear(in_features, part.rows, [part])
    return layer.dequantize()


# ---------------------------------------------------------------- loading: see gguf_loading.py
