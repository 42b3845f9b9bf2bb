"""Both DashInfer graphs (LLaMA_v2, Qwen_v20) against transformers on tiny random models.

Random weights make every part of the math count: GQA, rope_theta, q/k/v biases, tied or untied heads.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from dashinfer_helpers import HAVE_DASHINFER, SKIP_REASON, greedy, run

if not HAVE_DASHINFER:
    pytest.skip(SKIP_REASON, allow_module_level=True)

from dashchat.engine.args import EngineArgs
from dashchat.engine.dashinfer.engine import DashInferEngine

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 256, "initializer_range": 0.5}


def _tiny_model(kind: str, folder, smollm2_dir: str) -> str:
    import transformers

    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_theta=500000.0, tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**TINY, rope_theta=1000000.0, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():  # transformers starts biases at zero: make them count
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.config.vocab_size = 49152
    model.resize_token_embeddings(49152)
    model.to(torch.float32).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # any tokenizer: the tests speak token ids
        shutil.copy(f"{smollm2_dir}/{name}", folder / name)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_tiny_model_matches_transformers(kind, tmp_path, smollm2_dir, monkeypatch):
    monkeypatch.setenv("DASHCHAT_CACHE", str(tmp_path / "cache"))
    model = _tiny_model(kind, tmp_path / kind, smollm2_dir)
    engine = DashInferEngine.from_args(EngineArgs(model_dir=str(tmp_path / kind), max_model_len=64, max_num_seqs=2))
    try:
        for prompt in ([1, 2, 3, 4, 5], list(range(100, 140, 3))):
            want = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
            assert run(engine, prompt, greedy(12))[0].token_ids == want
    finally:
        engine.shutdown()
