"""A decode step's decoder layers in one C call (decode_step.c) for GGUF models on one CPU.

The table built here points the C code at the model's own tensors (norm weights, GGUF blocks,
biases, KV cache), so nothing is copied and the module path stays the reference: the C step chains
the same kernels in the same order, and its hidden states equal the modules' bit for bit.

A mixture of experts (SparseMoE) runs in the step when the module path runs it on the kernels: the
routed experts by GroupedGGUFExperts, the routing by kernel_softmax_top_k, the shared expert's gate
by kernel_sigmoid, its linears GGUF blocks; the router (and shared gate) GGUF blocks or a float32
PackedLinear, which the module path multiplies with the same C kernel only up to SMALL_BATCH_ROWS
rows: a larger decode step then runs the modules (`runs`).
"""

from __future__ import annotations

import ctypes
import logging

import torch
from torch import nn

from ...models.layers import DecoderLayer, GatedMLP
from ...models.moe import MoeDecoderLayer, SparseMoE
from ..quantization.gguf import FLOAT16_TYPES, GGUFLinear
from ..quantization.gguf_moe import GroupedGGUFExperts, PanelGate, kernel_sigmoid, kernel_softmax_top_k
from .kernels import kernel_library
from .linear import SMALL_BATCH_ROWS, PackedLinear
from .ops import KernelRMSNorm, kernel_rope_qk, kernel_silu_and_mul

log = logging.getLogger(__name__)

_MAX_PARTS = 4  # DC_MAX_PARTS
_p, _i = ctypes.c_void_p, ctypes.c_int


class _QLinear(ctypes.Structure):
    _fields_ = [("n", _i), ("k", _i), ("parts", _i), ("type", _i * _MAX_PARTS), ("rows", _i * _MAX_PARTS),
                ("blocks", _p * _MAX_PARTS), ("bias", _p * _MAX_PARTS)]  # fmt: skip


class _PackedLinear(ctypes.Structure):
    _fields_ = [("weight", _p), ("bias", _p), ("n", _i), ("k", _i)]


class _MoeBlock(ctypes.Structure):
    _fields_ = [("router", _QLinear), ("router_f32", _PackedLinear), ("shared_gate_f32", _PackedLinear),
                ("experts", _i), ("top_k", _i), ("norm_topk", _i), ("width", _i), ("shared_width", _i),
                ("types", _i * 3), ("k_full", _i * 3), ("k0", _i * 3), ("row_bytes", ctypes.c_int64 * 3),
                ("gate", _p), ("up", _p), ("down", _p), ("shared_gate", _QLinear), ("shared_gate_up", _QLinear),
                ("shared_down", _QLinear)]  # fmt: skip


class _Layer(ctypes.Structure):
    _fields_ = [("input_norm", _p), ("post_norm", _p), ("q_norm", _p), ("k_norm", _p), ("qkv", _QLinear),
                ("o", _QLinear), ("gate_up", _QLinear), ("down", _QLinear), ("k_cache", _p), ("v_cache", _p),
                ("moe", ctypes.POINTER(_MoeBlock))]  # fmt: skip


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


def _either_linear(layer: nn.Module) -> tuple[_QLinear, _PackedLinear] | None:
    """A router-like layer as the C step takes it: GGUF blocks, or a float32 PackedLinear whose
    small-batch kernel reads its packed weight (else None)."""
    if isinstance(layer, PanelGate):
        return _QLinear(), _PackedLinear(weight=layer.weight_ptr, bias=layer.bias_ptr, n=layer.out_features,
                                         k=layer.in_features)
    if isinstance(layer, PackedLinear):
        if layer._weight_ptr is None:
            return None
        return _QLinear(), _PackedLinear(weight=layer._weight_ptr, bias=layer._bias_ptr, n=layer.out_features,
                                         k=layer.in_features)
    q = _qlinear(layer)
    return None if q is None else (q, _PackedLinear())


def _moe_block(mlp: SparseMoE) -> tuple[_MoeBlock, bool] | None:
    """The C view of a mixture of experts run on the kernels (and whether a gate is a float
    PackedLinear: see `runs`), else None."""
    runner = mlp.expert_runner
    if not isinstance(runner, GroupedGGUFExperts) or mlp.softmax_top_k is not kernel_softmax_top_k:
        return None
    router = _either_linear(mlp.gate)
    if router is None:
        return None
    types, row_bytes, k_full, k0, gate, up, down = runner._args
    block = _MoeBlock(router=router[0], router_f32=router[1], experts=runner.count, top_k=mlp.top_k,
                      norm_topk=int(mlp.norm_topk_prob), width=runner.width, gate=ctypes.addressof(gate),
                      up=ctypes.addressof(up), down=ctypes.addressof(down))
    block.types[:], block.row_bytes[:], block.k_full[:], block.k0[:] = types[:], row_bytes[:], k_full[:], k0[:]
    packed = isinstance(mlp.gate, PackedLinear)  # the module path's product leaves the kernel past 16 rows
    if mlp.shared_expert is not None:
        shared, gate_layer = mlp.shared_expert, _either_linear(mlp.shared_expert_gate)
        linears = [_qlinear(shared.gate_up_proj), _qlinear(shared.down_proj)]
        if (gate_layer is None or None in linears or mlp.shared_gate_act is not kernel_sigmoid
                or shared.act_and_mul is not kernel_silu_and_mul):
            return None
        block.shared_gate, block.shared_gate_f32 = gate_layer
        block.shared_gate_up, block.shared_down = linears
        block.shared_width = shared.down_proj.in_features
        packed = packed or isinstance(mlp.shared_expert_gate, PackedLinear)
    return block, packed


def _norm(module: nn.Module | None, eps: float) -> int | None | bool:
    """A kernel norm's weight address (None for no norm); False when it is not one the step can run."""
    if module is None:
        return None
    if not isinstance(module, KernelRMSNorm) or module.eps != eps:
        return False
    return module.weight.data_ptr()


class FusedDecode:
    """Runs every decoder layer of a decode step: x [m, hidden] (float32, contiguous) in place."""

    def __init__(self, layers: ctypes.Array, shape: _Shape, keep: list, max_rows: int | None = None) -> None:
        self._layers, self._shape = layers, shape
        self._keep = keep  # the tensors (and C structs) the table points at
        self._lib = kernel_library()
        self.max_rows = max_rows  # None: any number of decode rows

    def runs(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs here (else the modules run it)."""
        return self.max_rows is None or rows <= self.max_rows

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
        keep: list = []
        widths, max_rows = [0], None
        for i, layer in enumerate(model.layers):
            if type(layer) not in (DecoderLayer, MoeDecoderLayer):  # Gemma 3's four norms a layer: not the C step's
                return None
            attn, mlp = layer.self_attn, layer.mlp
            if attn.rope_qk is not kernel_rope_qk:
                return None
            norms = [_norm(m, eps) for m in (layer.input_layernorm, layer.post_attention_layernorm, attn.q_norm,
                                             attn.k_norm)]
            linears = [_qlinear(m) for m in (attn.qkv_proj, attn.o_proj)]
            if isinstance(mlp, SparseMoE):
                found = _moe_block(mlp)
                if found is None:
                    return None
                moe, packed = found
                table[i].moe = ctypes.pointer(moe)
                keep += [moe, mlp.expert_runner]
                widths.append(moe.shared_width)
                max_rows = SMALL_BATCH_ROWS if packed else max_rows
            elif isinstance(mlp, GatedMLP) and mlp.act_and_mul is kernel_silu_and_mul:
                linears += [_qlinear(mlp.gate_up_proj), _qlinear(mlp.down_proj)]
                widths.append(mlp.down_proj.in_features)
            else:
                return None
            if any(n is False for n in norms) or norms[0] is None or norms[1] is None or None in linears:
                return None
            k_cache, v_cache = kv_cache[i]
            if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
                return None
            entry = table[i]
            entry.input_norm, entry.post_norm, entry.q_norm, entry.k_norm = norms
            entry.qkv, entry.o = linears[:2]
            if len(linears) == 4:
                entry.gate_up, entry.down = linears[2:]
            entry.k_cache, entry.v_cache = k_cache.data_ptr(), v_cache.data_ptr()
            keep += [k_cache, v_cache]
        shape = _Shape(layers=len(model.layers), hidden=cfg.hidden_size, heads=model.layers[0].self_attn.num_heads,
                       kv_heads=model.layers[0].self_attn.num_kv_heads, head_dim=cfg.head_dim,
                       intermediate=max(widths), block_size=block_size, eps=eps, scale=scale)
        return cls(table, shape, keep, max_rows)

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
            raise ValueError("fused decode step: a GGUF kernel rejected a layer (or an expert id)")
        return x
