"""Tiny random embedding and reranker folders, saved the way their users get them.

- `write_st_model(path, pooling)`: sentence-transformers saves a head-less Qwen3Model (no `model.`
  prefix, no lm_head) with `modules.json`, `1_Pooling` and `2_Normalize`.
- `write_causal_with_st_files(path)`: a Qwen3ForCausalLM checkpoint with the same files beside it.
- `write_reranker(path)`: a Qwen3ForCausalLM (served with --task score) whose tokenizer has the
  words "yes" and "no" as single tokens, like Qwen3-Reranker's.
The tokenizer is tiny_qwen3's byte-level one (Qwen3's markup as added tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

import tiny_qwen3

POOLING_MODES = {"last": "lasttoken", "mean": "mean", "cls": "cls"}


def _config():
    import transformers

    return transformers.Qwen3Config(
        vocab_size=tiny_qwen3.VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=tiny_qwen3.IM_END,
    )


def write_st_model(path: Path, pooling: str = "last", normalize: bool = True) -> Path:
    """A sentence-transformers folder around a head-less Qwen3Model."""
    import torch
    import transformers
    from sentence_transformers import SentenceTransformer

    try:  # sentence-transformers >= 6
        from sentence_transformers.sentence_transformer import modules as models
    except ImportError:
        from sentence_transformers import models

    src = path.parent / (path.name + "-src")
    tiny_qwen3.write_tokenizer(src)
    # Without a chat template, as embedding models ship: sentence-transformers 6 would otherwise
    # render every input through it ("message" modality).
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.pop("chat_template")
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    torch.manual_seed(1)
    transformers.Qwen3Model(_config()).eval().save_pretrained(src, safe_serialization=True)
    modules = [models.Transformer(str(src)),
               models.Pooling(64, pooling_mode=POOLING_MODES[pooling])]
    if normalize:
        modules.append(models.Normalize())
    SentenceTransformer(modules=modules, device="cpu").save(str(path))
    return path


def write_st_files(path: Path, pooling: str = "last", normalize: bool = True) -> None:
    """modules.json, 1_Pooling/config.json and 2_Normalize beside a checkpoint in `path`."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (path / "2_Normalize").mkdir(exist_ok=True)
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    mode = {f"pooling_mode_{k}": False for k in ("cls_token", "mean_tokens", "max_tokens",
                                                   "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")}
    mode[{"last": "pooling_mode_lasttoken", "mean": "pooling_mode_mean_tokens",
          "cls": "pooling_mode_cls_token"}[pooling]] = True
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **mode}))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 512, "do_lower_case": False}))


def write_causal_with_st_files(path: Path, pooling: str = "last") -> Path:
    tiny_qwen3.write_model(path)
    write_st_files(path, pooling)
    return path


def write_reranker(path: Path) -> Path:
    """tiny_qwen3's model with "yes" and "no" as added single tokens (ids 263 and 264)."""
    from tokenizers import AddedToken, Tokenizer

    tiny_qwen3.write_model(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    tok.add_tokens([AddedToken("yes", normalized=False), AddedToken("no", normalized=False)])
    tok.save(str(path / "tokenizer.json"))
    return path
