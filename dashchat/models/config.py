"""Model hyper-parameters, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP: a router scores `num_experts` experts per token and the top
    `top_k` run, their outputs weighted by the router's softmax (renormalised over the chosen ones
    when `norm_topk_prob`). Qwen2-MoE adds a shared expert every token runs, scaled by its own
    sigmoid gate."""

    num_experts: int
    top_k: int
    intermediate_size: int  # one expert's width
    norm_topk_prob: bool
    shared_intermediate_size: int = 0  # 0: no shared expert
    sparse_step: int = 1  # every sparse_step-th layer is MoE (Qwen2-MoE's decoder_sparse_step)
    dense_layers: tuple[int, ...] = ()  # layers kept dense (Qwen's mlp_only_layers)

    @classmethod
    def from_dict(cls, family: str, cfg: dict[str, Any]) -> "MoeConfig | None":
        if family not in ("qwen2_moe", "qwen3_moe", "mixtral"):
            return None
        experts = cfg.get("num_experts") or cfg.get("num_local_experts")
        return cls(
            num_experts=experts,
            top_k=cfg["num_experts_per_tok"],
            # Mixtral's experts are as wide as its intermediate_size; Qwen's have their own width
            intermediate_size=cfg.get("moe_intermediate_size") or cfg["intermediate_size"],
            norm_topk_prob=family == "mixtral" or bool(cfg.get("norm_topk_prob", False)),
            shared_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
            sparse_step=cfg.get("decoder_sparse_step") or 1,
            dense_layers=tuple(cfg.get("mlp_only_layers") or ()),
        )


@dataclass
class ModelConfig:
    architecture: str
    family: str  # a value of SUPPORTED_ARCHITECTURES
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    rope_scaling: dict[str, Any] | None = None
    torch_dtype: str | None = None
    moe: MoeConfig | None = None  # mixture-of-experts families only
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx`'s MLP is a routed mixture of experts (else a dense MLP)."""
        m = self.moe
        return m is not None and layer_idx not in m.dense_layers and (layer_idx + 1) % m.sparse_step == 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> "ModelConfig":
        archs = cfg.get("architectures") or [_MODEL_TYPES.get(cfg.get("model_type", ""), "")]
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5
            rope_theta = cfg["rope_parameters"].get("rope_theta")
            if cfg["rope_parameters"].get("rope_type", "default") != "default":
                rope_scaling = rope_scaling or cfg["rope_parameters"]
        return cls(
            architecture=arch,
            family=family,
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or hidden // num_heads,
            vocab_size=cfg["vocab_size"],
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", family in ("qwen2", "qwen2_moe")))),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            rope_scaling=rope_scaling,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            moe=MoeConfig.from_dict(family, cfg),
            raw=cfg,
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))
