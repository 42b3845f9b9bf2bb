"""Gemma 3 (the 1B text model, and the text model of the 4B+ multimodal checkpoints).

The Llama decoder with: per-head q/k RMSNorm; a norm after attention and after the MLP as well as
before each; GeGLU (tanh-approximated gelu) instead of SwiGLU; embeddings scaled by sqrt(hidden);
the attention scale from query_pre_attn_scalar; five layers in six attending over a sliding window
with their own RoPE base (no scaling), the sixth over the whole context with the global base (and
the config's scaling). Gemma's RMSNorm multiplies by (1 + w): the loader adds the 1 once, so the
model holds plain RMSNorm weights (and the CPU kernels' norm serves).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .config import ModelConfig
from .layers import AttentionBackend, GatedMLP, RMSNorm, Rope, RotaryEmbedding, SelfAttention
from .llama import LlamaForCausalLM
from .parallel import SINGLE, TensorParallel

# A multimodal checkpoint's tensors outside its text model
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE) -> None:
        super().__init__()
        self.sliding = (cfg.layer_types or [])[layer_idx] == "sliding_attention"  # the local RoPE base
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size // tp.size, tp, cfg.hidden_activation)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, rope: Rope, x: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(rope, self.input_layernorm(x), attention))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3ForCausalLM(LlamaForCausalLM):
    layer_class = Gemma3DecoderLayer

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE) -> None:
        super().__init__(cfg, tp)
        self.rotary_local = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_local_theta, None)
        self.embed_scale = cfg.hidden_size**0.5

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        # transformers rounds the scale to the weights' dtype first (bfloat16: sqrt(2560) -> 50.5)
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        rope_global = self.rotary(positions, x.dtype)
        rope_local = self.rotary_local(positions, x.dtype)
        for layer in self.layers:
            x = layer(rope_local if layer.sliding else rope_global, x, attention)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = super().compute_logits(hidden)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(_text_weights(weights))


def _text_weights(weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    """The text model's tensors under Gemma3ForCausalLM's names, norm weights as (1 + w)."""
    for name, tensor in weights:
        if name.startswith(_VISION_PREFIXES):
            continue
        if name.startswith("model.language_model."):  # transformers >= 5 multimodal layout
            name = "model." + name.removeprefix("model.language_model.")
        elif name.startswith("language_model."):  # the hub's multimodal layout
            name = name.removeprefix("language_model.")
        if name.endswith("norm.weight"):
            tensor = (tensor if isinstance(tensor, torch.Tensor) else tensor[...]).float() + 1.0
        yield name, tensor
