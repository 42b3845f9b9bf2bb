"""Phi-3 / Phi-3.5-mini / Phi-4-mini: the Llama decoder as checkpoints ship it with q/k/v and
gate/up already fused, LongRoPE scaling (layers.RotaryEmbedding) and, in Phi-4-mini, partial
rotary (config.partial_rotary_factor) and tied embeddings."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from .llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
        """The fused tensors cut into the q/k/v and gate/up parts the loader shards per rank (a lazy
        safetensors slice reads only the rows asked for)."""
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        parts = {
            "qkv_proj": (("q_proj", 0, q), ("k_proj", q, kv), ("v_proj", q + kv, kv)),
            "gate_up_proj": (("gate_proj", 0, cfg.intermediate_size), ("up_proj", cfg.intermediate_size,
                                                                       cfg.intermediate_size)),
        }
        for name, tensor in weights:
            module, _, leaf = name.rpartition(".")
            prefix, _, proj = module.rpartition(".")
            if proj not in parts:
                yield name, tensor
                continue
            for part, start, rows in parts[proj]:
                yield f"{prefix}.{part}.{leaf}", tensor[start : start + rows]
