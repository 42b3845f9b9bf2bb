"""Qwen2 / Qwen2.5: the Llama decoder with a bias on the q/k/v projections (config.attention_bias)."""

from .llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
