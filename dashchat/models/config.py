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
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its text model; the vision tower is not loaded
    "Phi3ForCausalLM": "phi3",
}


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM",
}

# What a Gemma 3 config.json may leave out: transformers' Gemma3TextConfig defaults (the 4B+
# checkpoints' text_config names only the fields that differ from these).
_GEMMA3_DEFAULTS = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 131_072, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "tie_word_embeddings": True,
    "hidden_activation": "gelu_pytorch_tanh", "sliding_window_pattern": 6,
}  # fmt: skip


class UnsupportedModelError(ValueError):
    pass


@dataclass
class ModelConfig:
    architecture: str
    family: str  # "llama" | "qwen2" | "qwen3" | "gemma3" | "phi3"
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
    raw: dict[str, Any] = field(default_factory=dict, repr=False)
    # Gemma 3 / Phi-3 (defaults: what every other family has)
    partial_rotary_factor: float = 1.0  # Phi-4-mini: RoPE turns the first 3/4 of each head only
    sliding_window: int | None = None  # keys a windowed layer's query sees, itself included
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention"
    rope_local_theta: float | None = None  # Gemma 3's sliding layers: their own base, no scaling
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (else head_dim ** -0.5)
    final_logit_softcapping: float | None = None
    hidden_activation: str = "silu"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def layer_windows(self) -> list[int | None]:
        """Per layer, the sliding window (None: the layer sees the whole context)."""
        if self.sliding_window is None:
            return [None] * self.num_layers
        types = self.layer_types or ["sliding_attention"] * self.num_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in types]

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
        if family == "gemma3":
            cfg = _gemma3_text_config(cfg)
        num_heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        rope_scaling = cfg.get("rope_scaling") or None
        rope_theta = cfg.get("rope_theta")
        if rope_theta is None and isinstance(cfg.get("rope_parameters"), dict):  # transformers >= 5
            rope_theta = cfg["rope_parameters"].get("rope_theta")
            if cfg["rope_parameters"].get("rope_type", "default") != "default":
                rope_scaling = rope_scaling or cfg["rope_parameters"]
        if family == "phi3" and rope_scaling:
            rope_scaling = _phi3_rope_scaling(cfg, rope_scaling)
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
            attention_bias=bool(cfg.get("attention_bias", family == "qwen2")),
            qk_norm=family in ("qwen3", "gemma3"),
            rope_scaling=rope_scaling,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=cfg,
            **_family_fields(family, cfg),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        with open(Path(model_dir) / "config.json", encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


def _gemma3_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's text model config with transformers' defaults filled in. A multimodal checkpoint
    nests it under text_config (its tie_word_embeddings stays at the top level)."""
    text = dict(cfg.get("text_config") or cfg)
    if "text_config" in cfg and "tie_word_embeddings" in cfg:
        text.setdefault("tie_word_embeddings", cfg["tie_word_embeddings"])
    params = text.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:  # transformers >= 5: per layer type
        full, local = params["full_attention"] or {}, params.get("sliding_attention") or {}
        text.setdefault("rope_theta", full.get("rope_theta"))
        text.setdefault("rope_local_base_freq", local.get("rope_theta"))
        if full.get("rope_type", "default") != "default":
            text.setdefault("rope_scaling", full)
        text.pop("rope_parameters")
    for key, value in _GEMMA3_DEFAULTS.items():
        if text.get(key) is None and not (key == "sliding_window" and "sliding_window" in text):
            text[key] = value
    text["architectures"] = cfg.get("architectures") or ["Gemma3ForCausalLM"]
    return text


def _phi3_rope_scaling(cfg: dict[str, Any], scaling: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's LongRoPE as one self-contained dict: transformers reads "su" and "yarn" as longrope
    too, and takes the original context and the default factor from the top level of the config."""
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind in ("su", "yarn", "longrope"):
        scaling = {**scaling, "rope_type": "longrope"}
        scaling.setdefault("original_max_position_embeddings", cfg.get("original_max_position_embeddings", 4096))
        scaling.setdefault("max_position_embeddings", cfg.get("max_position_embeddings", 4096))
    return scaling


def _family_fields(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """The fields only Gemma 3 and Phi-3 set."""
    if family == "gemma3":
        pattern = cfg.get("sliding_window_pattern") or 6
        types = cfg.get("layer_types") or [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])
        ]
        return dict(
            sliding_window=cfg.get("sliding_window"), layer_types=list(types),
            rope_local_theta=float(cfg["rope_local_base_freq"]), query_pre_attn_scalar=cfg["query_pre_attn_scalar"],
            final_logit_softcapping=cfg.get("final_logit_softcapping"),
            hidden_activation=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        )
    if family == "phi3":
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        window = cfg.get("sliding_window")
        if window is not None and window >= cfg.get("max_position_embeddings", 4096):
            window = None  # Phi-3.5 / Phi-4-mini: 262144, wider than any context
        return dict(
            partial_rotary_factor=float(cfg.get("partial_rotary_factor") or rope.get("partial_rotary_factor") or 1.0),
            sliding_window=window,
        )
    return {}
