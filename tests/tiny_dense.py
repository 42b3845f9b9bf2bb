"""Tiny random Gemma 3 and Phi-3 checkpoints (transformers writes them) and a forward through the
engine's paged attention, shared by the family tests and the tensor-parallel rank processes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

_TEXT = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, rms_norm_eps=1e-6)  # fmt: skip

_GEMMA3 = dict(
    # Gemma 3's own layer pattern (five sliding layers, then a global one), which GGUF files imply
    _TEXT, num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=24, sliding_window=8, final_logit_softcapping=30.0,
    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1_000_000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}},
    pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
)  # fmt: skip

_PHI3 = dict(
    _TEXT, num_hidden_layers=2, original_max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                     "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 1.5, 2.5, 4.0, 6.0, 9.0]},
    tie_word_embeddings=True,
)  # fmt: skip

FAMILIES = {
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", _GEMMA3),
    # Phi-4-mini's shape: LongRoPE, partial rotary (3/4 of each head), tied embeddings
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _PHI3),
    # Phi-3-mini-4k's: full rotary, no scaling, a sliding window on every layer, untied head
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", dict(
        _TEXT, num_hidden_layers=2, sliding_window=12, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False)),
}


def save_tiny_dense(family: str, path, tokenizer_from=None) -> torch.nn.Module:
    """`tokenizer_from`: a model folder whose tokenizer the tiny model takes (its vocabulary size
    too), as llama.cpp's converter needs a real one."""
    import shutil

    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    if tokenizer_from is not None:
        shutil.copy(Path(tokenizer_from) / "tokenizer.json", Path(path) / "tokenizer.json")
        tok_cfg = json.loads((Path(tokenizer_from) / "tokenizer_config.json").read_text())
        if model_cls == "Phi3ForCausalLM":  # as Phi-4-mini ships: the converter reads tokenizer.json then
            tok_cfg["tokenizer_class"] = "GPT2Tokenizer"
        (Path(path) / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        vocab = json.loads((Path(tokenizer_from) / "config.json").read_text())["vocab_size"]
        extra = {**extra, "vocab_size": vocab}
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**extra)).eval()
    with torch.no_grad():  # Gemma's norms start at w = 0, i.e. (1 + w) = 1: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return model


def save_tiny_gemma3_multimodal(path) -> torch.nn.Module:
    """Gemma3ForConditionalGeneration with a one-layer vision tower: dashchat serves its text model."""
    import transformers

    torch.manual_seed(0)
    text = {k: v for k, v in _GEMMA3.items() if k not in ("pad_token_id", "bos_token_id", "eos_token_id")}
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)  # fmt: skip
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=300, boi_token_index=301, eoi_token_index=302)
    model = transformers.Gemma3ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    model.save_pretrained(path, safe_serialization=True)
    return model


def paged_logits(model: torch.nn.Module, ids: list[int], chunks: list[int] | None = None, block_size: int = 4
                 ) -> torch.Tensor:  # fmt: skip
    """Logits of every position of one sequence through PagedAttention: prefilled in `chunks`
    (default: at once), each later chunk attending over the cached ones, or chunk size 1 fed as
    decodes. The model's layers' windows and scale come from its config."""
    from dashchat.engine.native.attention import PagedAttention, PrefillSpan, StepAttentionMetadata

    cfg = model.config
    blocks = -(-len(ids) // block_size)
    heads = model.layers[0].self_attn.num_kv_heads
    cache = [(torch.zeros(blocks * block_size, heads, cfg.head_dim), torch.zeros(blocks * block_size, heads,
                                                                                  cfg.head_dim))
             for _ in range(cfg.num_layers)]  # fmt: skip
    table = torch.arange(blocks - 1, -1, -1)  # blocks out of order, as a block manager hands them out
    attention = PagedAttention(cache, block_size, cfg.attention_scale, windows=cfg.layer_windows)
    out, start = [], 0
    for n in chunks or [len(ids)]:
        positions = torch.arange(start, start + n)
        slots = table[positions // block_size] * block_size + positions % block_size
        if n == 1 and start:
            meta = StepAttentionMetadata(slots, 1, table[None], torch.tensor([start + 1]), [])
        else:
            meta = StepAttentionMetadata(slots, 0, None, None, [PrefillSpan(0, n, start + n, table)])
        attention.begin_step(meta)
        with torch.inference_mode():
            out.append(model.compute_logits(model(torch.tensor(ids[start : start + n]), positions, attention)))
        start += n
    return torch.cat(out)


def rank_paged_logits(rank: int, size: int, port: int, model_dirs: list[str], ids: list[int], chunks: list[int],
                      out_dir: str, gguf: bool = False) -> None:  # fmt: skip
    """A tensor-parallel rank process: each model's shard on this rank (from the safetensors, or
    from the GGUF file's blocks), through `paged_logits`; rank 0 saves the logits."""
    from dashchat.distributed.group import ParallelGroup
    from dashchat.engine.quantization.gguf_loading import gguf_source, load_gguf_model
    from dashchat.models.config import ModelConfig
    from dashchat.models.layers import materialize_rotary
    from dashchat.models.parallel import ShardPlan
    from dashchat.models.registry import build_model
    from dashchat.models.weights import iter_weight_slices

    torch.set_num_threads(1)
    group = ParallelGroup(rank, size, torch.device("cpu"), "127.0.0.1", port)
    try:
        group.start_serving(60)
        for i, model_dir in enumerate(model_dirs):
            cfg = ModelConfig.from_dir(model_dir)
            if gguf:
                with torch.device("meta"):
                    model = build_model(cfg, group.tensor_parallel())
                load_gguf_model(model, gguf_source(model_dir), cfg, ShardPlan(cfg, rank, size))
                materialize_rotary(model, "cpu")
            else:
                model = build_model(cfg, group.tensor_parallel())
                model.load_weights(iter_weight_slices(model_dir))
                if cfg.tie_word_embeddings:
                    model.lm_head.weight = model.embed_tokens.weight
            logits = paged_logits(model.eval(), ids, chunks)
            if rank == 0:
                torch.save(logits, f"{out_dir}/logits-{i}.pt")
    finally:
        group.destroy()
