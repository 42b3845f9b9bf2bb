"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B): Qwen2's decoder (qkv bias) with routed experts plus a
shared expert every token runs, scaled by its own sigmoid gate (see moe.py)."""

from .llama import LlamaForCausalLM
from .moe import MoeDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_class = MoeDecoderLayer
