"""A decode step's decoder layers in one C call (decode_step.c) for GGUF models on one CPU.

The table built here points the C code at the model's own tensors (norm weights, GGUF blocks,
biases, KV cache), so nothing is copied and the module path stays the reference: the C step chains
the same kernels in the same order, and its hidden states equal the modules' bit for bit.
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from ...models.layers import DecoderLayer, GatedMLP
from ..quantization.gguf import FLOAT16_TYPES, GGUFLinear
from .kernels import kernel_library
from .ops import KernelRMSNorm, kernel_rope_qk, kernel_silu_and_mul

log = logging.getLogger(__name__)

_MAX_PARTS = 4  # DC_MAX_PARTS
_p, _i = ctypes.c_void_p, ctypes.c_int


class _QLinear(ctypes.Structure):
    _fields_ = [("n", _i), ("k", _i), ("parts", _i), ("type", _i * _MAX_PARTS), ("rows", _i * _MAX_PARTS),
                ("blocks", _p * _MAX_PARTS), ("bias", _p * _MAX_PARTS)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p), ("qkv", _QLinear),
                ("o", _QLinear), ("gate_up", _QLinear), ("down", _QLinear), ("k_cache", _p), ("v_cache", _p)]  # fmt: skip


class _Shape(ctypes.Structure):
    _fields_ = [("layers", _i), ("hidden", _i), ("heads", _i), ("kv_heads", _i), ("head_dim", _i),
                ("intermediate", _i), ("block_size", _i), ("eps", ctypes.c_float), ("scale", ctypes.c_float)]  # fmt: skip


def _qlinear(layer: nn.Module) -> _QLinear | None:
    """The C view of a GGUFLinear on one device (whole rows, every output filled, integer-product
    types), else None."""
    if not isinstance(layer, GGUFLinear) or len(layer.parts) > _MAX_PARTS:
        return None
    if sum(p.rows for p in layer.parts) != layer.out_features:
        return None
    if any(p.k_full != layer.in_features or p.k0 for p in layer.parts):
        return None
    if any(p.type_name in FLOAT16_TYPES for p in layer.parts):  # float products: the module's own path
        return None
    q = _QLinear(n=layer.out_features, k=layer.in_features, parts=len(layer.parts))
    row = 0
    for i, part in enumerate(layer.parts):
        q.type[i], q.rows[i], q.blocks[i] = part.type_id, part.rows, part.data.data_ptr()
        q.bias[i] = None if layer.bias is None else layer.bias.data_ptr() + 4 * row
        row += part.rows
    return q


def _norm(module: nn.Module | None, eps: float) -> int | None | bool:
    """A kernel norm's weight address (None for no norm); False when it is not one the step can run."""
    if module is None:
        return None
    if not isinstance(module, KernelRMSNorm) or module.eps != eps:
        return False
    return module.weight.data_ptr()


class FusedDecode:
    """Runs every decoder layer of a decode step: x [m, hidden] (float32, contiguous) in place."""

    def __init__(self, layers: ctypes.Array, shape: _Shape, keep: list[torch.Tensor]) -> None:
        self._layers, self._shape = layers, shape
        self._keep = keep  # the tensors the table points at
        self._lib = kernel_library()

    @classmethod
    def build(cls, model: nn.Module, kv_cache: list[tuple[torch.Tensor, torch.Tensor]], block_size: int,
              scale: float) -> "FusedDecode | None":
        """The fused step for `model`, or None when any layer is not all GGUF blocks and kernel ops
        on one CPU (float fallbacks, tensor parallelism, PyTorch's own ops): the modules run then."""
        lib = kernel_library()
        cfg = getattr(model, "config", None)
        if lib is None or cfg is None or getattr(model, "tp", None) is None or model.tp.size != 1:
            return None
        if not kv_cache or kv_cache[0][0].device.type != "cpu" or kv_cache[0][0].dtype != torch.float32:
            return None
        if cfg.rotary_dim != cfg.head_dim or any(w is not None for w in cfg.layer_windows):
            return None  # partial rotary, sliding windows: the C step has neither
        eps = cfg.rms_norm_eps
        table = (_Layer * len(model.layers))()
        keep: list[torch.Tensor] = []
        for i, layer in enumerate(model.layers):
            if type(layer) is not DecoderLayer:  # Gemma 3's four norms a layer: not the C step's shape
                return None
            attn, mlp = layer.self_attn, layer.mlp
            if not isinstance(mlp, GatedMLP):  # a mixture of experts: the step in C has dense MLPs only
                return None
            if attn.rope_qk is not kernel_rope_qk or mlp.act_and_mul is not kernel_silu_and_mul:
                return None
            norms = [_norm(m, eps) for m in (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm,
                                             attn.k_norm)]
            linears = [_qlinear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
            if any(n is False for n in norms) or norms[0] is None or norms[1] is None or None in linears:
                return None
            k_cache, v_cache = kv_cache[i]
            if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
                return None
            entry = table[i]
            entry.input_norm, entry.post_norm, entry.q_norm, entry.k_norm = norms
            entry.qkv, entry.o, entry.gate_up, entry.down = linears
            entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            keep += [k_cache, v_cache]
        shape = _Shape(layers=len(model.layers), hidden=cfg.hidden_size, heads=model.layers[0].self_attn.num_heads,
                       kv_heads=model.layers[0].self_attn.num_kv_heads, head_dim=cfg.head_dim,
                       intermediate=model.layers[0].mlp.down_proj.in_features, block_size=block_size, eps=eps,
                       scale=scale)
        return cls(table, shape, keep)

    def __call__(self, x: torch.Tensor, slots: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 block_tables: torch.Tensor, context_lens: torch.Tensor) -> torch.Tensor:
        tables, lens = block_tables.contiguous(), context_lens.contiguous()
        slots, cos, sin = slots.contiguous(), cos.contiguous(), sin.contiguous()
        status = self._lib.dc_gguf_decode_layers(
            ctypes.byref(self._layers), ctypes.byref(self._shape), x.data_ptr(), x.shape[0], slots.data_ptr(),
            cos.data_ptr(), sin.data_ptr(), tables.data_ptr(), lens.data_ptr(), tables.shape[1])
        if status == -2:
            raise MemoryError("fused decode step: no memory for its scratch")
        if status:
            raise ValueError("fused decode step: a GGUF kernel rejected a layer")
        return x
