"""Gemma 3 and Phi-3 / Phi-4-mini against transformers (float32) on tiny random checkpoints: the
model code through the paged attention (whole, chunked, decoded token by token), then the engine
(several requests at once, chunked prefill, a prefix hit, decoding past Phi-3's original context)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig, UnsupportedModelError
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from engine_helpers import collect, greedy_tokens
from tiny_dense import FAMILIES, paged_logits, save_tiny_dense, save_tiny_gemma3_multimodal
from tiny_models import save_word_tokenizer

transformers = pytest.importorskip("transformers")

IDS = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1)).tolist()


def _ours(path) -> torch.nn.Module:
    model = build_model(ModelConfig.from_dir(path))
    model.load_weights(iter_weights(path))
    return model.eval()


@pytest.mark.parametrize("family", [*sorted(FAMILIES), "gemma3-multimodal"])
def test_logits_match_transformers(family, tmp_path):
    """Prompt longer than every window: whole, in chunks over the cached ones, then decodes."""
    ref = save_tiny_gemma3_multimodal(tmp_path) if family == "gemma3-multimodal" else save_tiny_dense(family, tmp_path)
    ours = _ours(tmp_path)
    with torch.inference_mode():
        expected = ref(torch.tensor([IDS])).logits[0].float()
    for chunks in (None, [13, 14, 13], [30] + [1] * 10):
        torch.testing.assert_close(paged_logits(ours, IDS, chunks), expected, atol=2e-4, rtol=1e-4,
                                   msg=f"{family} {chunks}")


def test_config_fields(tmp_path):
    save_tiny_dense("gemma3", tmp_path)
    cfg = ModelConfig.from_dir(tmp_path)
    assert cfg.layer_windows == [8, 8, None] and cfg.rope_local_theta == 10_000.0 and cfg.rope_theta == 1e6
    assert cfg.rope_scaling["factor"] == 2.0 and cfg.attention_scale == 24**-0.5
    # a hub multimodal config names only what differs from Gemma3TextConfig's defaults
    hub = ModelConfig.from_dict({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
                                 "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                                 "num_hidden_layers": 34, "sliding_window": 1024,
                                                 "rope_scaling": {"factor": 8.0, "rope_type": "linear"}}})
    assert (hub.num_heads, hub.num_kv_heads, hub.head_dim, hub.vocab_size) == (8, 4, 256, 262_208)
    assert hub.layer_windows[:6] == [1024] * 5 + [None] and hub.tie_word_embeddings
    assert (hub.rope_theta, hub.rope_local_theta, hub.rope_scaling["factor"]) == (1e6, 1e4, 8.0)
    # Phi-4-mini's hub config (transformers < 5 layout)
    phi = ModelConfig.from_dict({"architectures": ["Phi3ForCausalLM"], "hidden_size": 3072, "num_attention_heads": 24,
                                 "num_key_value_heads": 8, "intermediate_size": 8192, "num_hidden_layers": 32,
                                 "vocab_size": 200064, "partial_rotary_factor": 0.75, "max_position_embeddings": 131072,
                                 "original_max_position_embeddings": 4096, "sliding_window": 262144,
                                 "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 48,
                                                  "long_factor": [2.0] * 48}})
    assert phi.rotary_dim == 96 and phi.layer_windows == [None] * 32
    assert phi.rope_scaling["original_max_position_embeddings"] == 4096 and phi.rope_scaling["rope_type"] == "longrope"
    with pytest.raises(UnsupportedModelError, match="Gemma3ForCausalLM.*Phi3ForCausalLM"):
        ModelConfig.from_dict({"architectures": ["Gemma2ForCausalLM"]})


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_engine_greedy_matches_transformers(family, tmp_path):
    """Five requests at once in 24-token steps (chunked prefill beside decodes), then one whose
    prompt repeats the first's (a prefix hit). Phi-3's decodes pass its original context (64):
    from there its keys take the long factors, as in transformers' cached generation."""
    ref = save_tiny_dense(family, tmp_path)
    save_word_tokenizer(tmp_path, eos="t2")
    prompts = [[(7 * i + 3 * j) % 290 + 5 for j in range(n)] for i, n in enumerate([3, 21, 9, 45, 14])]
    new_tokens = [12, 40, 6, 30, 16]
    repeat = prompts[3] + [17, 18, 19]
    expected = greedy_tokens(ref, [*prompts, repeat], [*new_tokens, 8])
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=128, block_size=4,
                                                 max_num_batched_tokens=24))
    try:
        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        async def run() -> tuple[list[list[int]], list[int], int]:
            outs = await asyncio.gather(*(collect(engine, p, params(n), delay=0.01 * i)
                                          for i, (p, n) in enumerate(zip(prompts, new_tokens))))
            hits = engine.stats().prefix_cache_hits
            again = await collect(engine, repeat, params(8))
            return [o[0].token_ids for o in outs], again[0].token_ids, engine.stats().prefix_cache_hits - hits

        together, again, hits = asyncio.run(run())
        assert together == expected[:5]
        assert again == expected[5]
        assert hits >= 40
    finally:
        engine.shutdown()
