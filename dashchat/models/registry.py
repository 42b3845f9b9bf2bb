"""Architecture name -> model class."""

from __future__ import annotations

from torch import nn

from .config import ModelConfig
from .gemma3 import Gemma3ForCausalLM
from .llama import LlamaForCausalLM
from .mixtral import MixtralForCausalLM
from .parallel import SINGLE, TensorParallel
from .phi3 import Phi3ForCausalLM
from .qwen2 import Qwen2ForCausalLM
from .qwen2_moe import Qwen2MoeForCausalLM
from .qwen2_vl import Qwen2VLForConditionalGeneration
from .qwen3 import Qwen3ForCausalLM
from .qwen3_moe import Qwen3MoeForCausalLM

_FAMILIES: dict[str, type[LlamaForCausalLM]] = {
    "llama": LlamaForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "mixtral": MixtralForCausalLM,
    "gemma3": Gemma3ForCausalLM,
    "phi3": Phi3ForCausalLM,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
}


def build_model(cfg: ModelConfig, tp: TensorParallel = SINGLE) -> nn.Module:
    return _FAMILIES[cfg.family](cfg, tp)
