"""Mixtral: Mistral's decoder with a mixture of 8 experts, 2 a token (see moe.py)."""

from .llama import LlamaForCausalLM
from .moe import MoeDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    layer_class = MoeDecoderLayer
    # Its checkpoints name the block `block_sparse_moe` and the expert projections w1 (gate),
    # w3 (up), w2 (down); ours are Qwen's names.
    _RENAMES = {"block_sparse_moe": "mlp", "w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}

    def checkpoint_name(self, name: str) -> str:
        return ".".join(self._RENAMES.get(p, p) for p in name.split("."))
