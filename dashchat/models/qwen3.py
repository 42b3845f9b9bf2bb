"""Qwen3: the Llama decoder with per-head RMSNorm on queries and keys (config.qk_norm)."""

from .llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    pass
