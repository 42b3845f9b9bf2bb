"""Tiny random checkpoints of every supported family (transformers writes them), for tests that
need a real model folder in a second: engine tests, tensor-parallel tests."""

from __future__ import annotations

import json

import torch

_COMMON = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
)

FAMILIES = {
    "llama3-rope-scaling": (
        "LlamaConfig", "LlamaForCausalLM",
        dict(rope_theta=500000.0, tie_word_embeddings=False, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=10000.0, sliding_window=None)),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=True)),
    # one KV head for four query heads: tensor-parallel ranks replicate it
    "llama-one-kv-head": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=1, tie_word_embeddings=False)),
    # mixtures of experts: widths of 64 so a tensor-parallel rank's slice of an expert stays on
    # GGUF's 32-value groups; Qwen2-MoE's second layer is dense (mlp_only_layers)
    "qwen3-moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        rope_theta=1000000.0, head_dim=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=64,
        norm_topk_prob=True, tie_word_embeddings=False)),
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        rope_theta=1000000.0, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, norm_topk_prob=False, mlp_only_layers=[1], tie_word_embeddings=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(
        rope_theta=1000000.0, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
}


def save_tiny(family: str, path) -> "torch.nn.Module":
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    import transformers

    config = getattr(transformers, config_cls)(**{**_COMMON, **extra})
    model = getattr(transformers, model_cls)(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    return model


def save_tiny_for_gguf(family: str, path, tokenizer_from) -> None:
    """A family's tiny checkpoint with the tokenizer (and vocabulary size) of the model folder
    `tokenizer_from`, as llama.cpp's converter needs a real one. Qwen2-MoE without its dense layer:
    llama.cpp's qwen2moe has none."""
    import shutil
    from pathlib import Path

    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    extra = {**extra, "mlp_only_layers": []} if "mlp_only_layers" in extra else extra
    vocab = json.loads((Path(tokenizer_from) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**_COMMON, **extra, "vocab_size": vocab})
    getattr(transformers, model_cls)(config).eval().save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(tokenizer_from) / name, Path(path) / name)


def save_word_tokenizer(path, eos: str = "t1") -> None:
    """A minimal tokenizer folder: the engine needs one, the tests feed token ids."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"t{i}": i for i in range(320)}, unk_token="t0")).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": eos}))


def save_tiny_chat_model(path) -> None:
    """A tiny random Llama that speaks through SmolLM2's real tokenizer and chat template: a server
    can chat with it (gibberish, greedy and repeatable) and start in seconds; 4 heads, 2 KV heads,
    so it splits over 2 or 4 ranks."""
    import shutil

    import transformers

    from dashchat.models.resolve import resolve_model

    source = resolve_model("smollm2-135m-instruct").path
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (source / name).is_file():
            shutil.copy(source / name, path / name)
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**_COMMON, "vocab_size": vocab, "max_position_embeddings": 2048,
                                         "tie_word_embeddings": True})
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)


def save_stub_gguf(path, architecture: str) -> None:
    """A GGUF file with one small tensor and `general.architecture` set, for code that sorts GGUF
    files by their header (a `clip` one is a multimodal projector, not a model)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), architecture)
    w.add_tensor("t.weight", np.zeros((2, 2), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
