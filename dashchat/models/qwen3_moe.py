"""Qwen3-MoE: Qwen3's decoder (q/k norms) with a routed mixture of experts in its layers (128
experts, 8 a token at 30B-A3B; see moe.py)."""

from .llama import LlamaForCausalLM
from .moe import MoeDecoderLayer


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer_class = MoeDecoderLayer
