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
    "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",  # its text model; the vision tower is not loaded
    "Phi3ForCausalLM": "phi3",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",  # with its vision tower
    "Qwen2_5_VLForConditionalGeneration": "qwen2_vl",
    # Head-less transformers, as sentence-transformers saves embedding models (models/pooling.py)
    "LlamaModel": "llama",
    "Qwen2Model": "qwen2",
    "Qwen3Model": "qwen3",
}


_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma3": "Gemma3ForConditionalGeneration",
    "phi3": "Phi3ForCausalLM",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
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
        if family == "gemma3":
            cfg = _gemma3_text_config(cfg)
        elif family == "qwen2_vl":
            cfg = _qwen2_vl_text_config(cfg)
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
            # a head-less checkpoint has no lm_head: the embedding stands in (it is never sampled)
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)) or arch.endswith("Model"),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("qkv_bias", family in ("qwen2", "qwen2_moe", "qwen2_vl")))),
            qk_norm=family in ("qwen3", "qwen3_moe", "gemma3"),
            rope_scaling=rope_scaling,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            moe=MoeConfig.from_dict(family, cfg),
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


def _qwen2_vl_text_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Qwen2-VL's text fields at the top level (transformers >= 5 nests them under text_config), its
    M-RoPE sections as `mrope_section` and plain RoPE otherwise ("mrope" is not a scaling)."""
    text = {**cfg, **(cfg.get("text_config") or {})}
    text["architectures"] = cfg.get("architectures") or [_MODEL_TYPES[cfg["model_type"]]]
    text["vision_config"] = cfg.get("vision_config") or {}
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if key in cfg:
            text[key] = cfg[key]
    rope = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    text["mrope_section"] = rope.get("mrope_section")
    text["rope_theta"] = text.get("rope_theta") or rope.get("rope_theta")
    text["rope_scaling"] = text["rope_parameters"] = None
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
