"""A tiny random-weight Qwen3 checkpoint with Qwen3's real chat template, for reasoning tests.

The tokenizer is byte-level BPE without merges (token i < 256 is byte i) plus Qwen3's markup as
added tokens: <|im_start|>/<|im_end|>/<|endoftext|> special, <think>, </think>, <tool_call>,
</tool_call> not special (as in Qwen3, so they survive detokenizing). The weights are random, so
tests steer it with logit_bias and grammars, or drive the text pipeline with scripted outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

TEMPLATE_PATH = Path(__file__).parent / "data" / "qwen3_chat_template.jinja"
QWEN3_TEMPLATE = TEMPLATE_PATH.read_text(encoding="utf-8")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MARKUP = ["<think>", "</think>", "<tool_call>", "</tool_call>"]
IDS = {t: 256 + i for i, t in enumerate(SPECIAL + MARKUP)}
THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN = IDS["<think>"], IDS["</think>"], IDS["<tool_call>"]
IM_END = IDS["<|im_end|>"]
VOCAB_SIZE = 320  # the model's (padded) vocabulary; the tokenizer has 263 ids


def write_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    from dashchat.tokenizer import bytes_to_unicode

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP])
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": QWEN3_TEMPLATE,
    }))


def write_model(path: Path) -> Path:
    """Tokenizer, config and random weights of a 2-layer Qwen3 in `path`."""
    import torch
    import transformers

    write_tokenizer(path)
    torch.manual_seed(0)
    config = transformers.Qwen3Config(
        vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, eos_token_id=IM_END,
    )
    transformers.Qwen3ForCausalLM(config).eval().save_pretrained(path, safe_serialization=True)
    return path
