"""Layers shared by every model family: norm, rotary embedding, MLP, attention block.

Models work on a flat token batch `[num_tokens, hidden]` (all sequences of a step
concatenated); attention over the paged KV cache is delegated to the engine's
`AttentionBackend`, so model code knows nothing about batching or caching.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .parallel import SINGLE, ShardPlan, TensorParallel


class AttentionBackend(Protocol):
    def __call__(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] for this step's tokens -> attention output [N, Hq * D]."""
        ...


Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin for this step's positions, [N, 1, head_dim / 2]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def _rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = _rope_kind(scaling)
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        # Llama 3.1: low frequencies are scaled, high kept, the band between blended.
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(mid, blended, scaled)
    raise ValueError(f"unsupported rope_scaling type {kind!r}; supported: default, linear, llama3, longrope")


def _rope_kind(scaling: dict[str, Any] | None) -> str:
    return (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"


def _longrope_angles(rotary_dim: int, max_positions: int, theta: float, scaling: dict[str, Any]
                     ) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Phi-3's LongRoPE: per-frequency factors, the short set within the original context and the
    long set beyond it, and cos/sin scaled by an attention factor that depends on the extension.

    transformers picks one set per forward from its longest position, so a prompt longer than the
    original context is rotated with the long set from its first token. Here the set is fixed per
    position (short below the original length, long from it on): a cached key is never rotated
    again, so a sequence that grows past the original length keeps its short-set keys, which is
    what transformers' own cached generation does too. The two agree wherever the prompt fits the
    original context. (vLLM picks the long set for a whole batch once any of its positions passes
    the original length; llama.cpp picks one set at load from the context size it is given.)"""
    orig = scaling["original_max_position_embeddings"]
    factor = scaling.get("factor") or scaling.get("max_position_embeddings", orig) / orig
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    shape = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    positions = torch.arange(max_positions, dtype=torch.float64)
    angles = []
    for key, rows in (("short_factor", positions[:orig]), ("long_factor", positions[orig:])):
        inv_freq = 1.0 / (torch.tensor(scaling[key], dtype=torch.float64) * theta**shape)
        angles.append(torch.outer(rows, inv_freq))
    return torch.cat(angles), attention


class RotaryEmbedding(nn.Module):
    """Neox-style (rotate-half) RoPE with a precomputed cos/sin table. `head_dim` is the rotated
    width: less than the head's under partial rotary (the rest of the head passes unrotated)."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self._args = (head_dim, max_positions, theta, scaling)
        cos, sin = self._tables()
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim, max_positions, theta, scaling = self._args
        scale = 1.0
        if _rope_kind(scaling) == "longrope":
            freqs, scale = _longrope_angles(head_dim, max_positions, theta, scaling)
        else:
            positions = torch.arange(max_positions, dtype=torch.float64)
            freqs = torch.outer(positions, _rope_inv_freq(head_dim, theta, scaling))
        return (freqs.cos() * scale).float(), (freqs.sin() * scale).float()

    def materialize(self, device: torch.device | str) -> None:
        """Compute the tables on `device` (a model built on the meta device has none)."""
        cos, sin = self._tables()
        self.cos, self.sin = cos.to(device), sin.to(device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The step's cos/sin rows, looked up once and shared by every layer."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)  # [N, 1, D/2]


def materialize_rotary(model: nn.Module, device: torch.device | str) -> None:
    """Every RoPE table of the model (Gemma 3 has two) computed on `device`."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.materialize(device)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope
    rotated = 2 * cos.shape[-1]
    if rotated < x.shape[-1]:  # partial rotary: the head's tail passes as it is
        return torch.cat((apply_rope(x[..., :rotated], rope), x[..., rotated:]), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_rope_qk(q: torch.Tensor, k: torch.Tensor, rope: Rope) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope(q, rope), apply_rope(k, rope)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


_ACTIVATIONS = {"silu": silu_and_mul, "gelu_pytorch_tanh": gelu_tanh_and_mul, "gelu_tanh": gelu_tanh_and_mul}


class GatedMLP(nn.Module):
    """SwiGLU (or GeGLU: Gemma) MLP with gate and up projections fused into one matmul. Under tensor
    parallelism `intermediate` is this rank's slice and the partial down projections are summed over ranks."""

    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel = SINGLE, activation: str = "silu") -> None:
        super().__init__()
        self.tp = tp
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unsupported MLP activation {activation!r}; supported: {', '.join(_ACTIVATIONS)}")
        self.act_and_mul = _ACTIVATIONS[activation]  # an engine may put a fused kernel in place of silu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(self.act_and_mul(self.gate_up_proj(x))))


class SelfAttention(nn.Module):
    """Q/K/V fused into one projection; optional qkv bias (Qwen2) and per-head q/k norm (Qwen3)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.tp = tp
        plan = ShardPlan(cfg, tp.rank, tp.size)  # this rank's heads (all of them at size 1)
        self.num_heads, self.num_kv_heads, self.head_dim = plan.num_heads, plan.num_kv_heads, cfg.head_dim
        self.q_size = self.num_heads * cfg.head_dim
        self.kv_size = self.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rope_qk = apply_rope_qk  # an engine may put a fused kernel here

    def forward(self, rope: Rope, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope_qk(q, k, rope)
        return self.tp.all_reduce(self.o_proj(attention(self.layer_idx, q, k, v)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE, mlp: nn.Module | None = None
                 ) -> None:  # fmt: skip
        """`mlp`: the layer's MLP where it is not the dense one (a mixture of experts)."""
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp if mlp is not None else GatedMLP(cfg.hidden_size, cfg.intermediate_size // tp.size, tp)

    def forward(self, rope: Rope, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        x = x + self.self_attn(rope, self.input_layernorm(x), attention)
        return x + self.mlp(self.post_attention_layernorm(x))
