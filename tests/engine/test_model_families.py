"""Every supported family's model code against transformers, on tiny random checkpoints.

The embedded models cover llama (SmolLM2) and qwen2 (Qwen2.5); this covers the rest:
Llama 3.1 rope scaling, Mistral, Qwen3's q/k norm, untied heads, and GQA shapes.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.cuda.graphs import PaddedDecode, bucket
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.quantization.int8 import _causal_attention
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig
from dashchat.models.registry import build_model
from dashchat.models.weights import iter_weights
from engine_helpers import collect, greedy_tokens
from tiny_models import FAMILIES, save_tiny as _save_tiny, save_word_tokenizer as _save_word_tokenizer

transformers = pytest.importorskip("transformers")

@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_logits_match_transformers(family, tmp_path):
    ref = _save_tiny(family, tmp_path)
    cfg = ModelConfig.from_dir(tmp_path)
    ours = build_model(cfg)
    ours.load_weights(iter_weights(tmp_path))
    ours.eval()
    ids = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = ref(ids[None]).logits[0].float()
        got = ours.compute_logits(ours(ids, torch.arange(len(ids)), _causal_attention))
    torch.testing.assert_close(got, expected, atol=2e-4, rtol=1e-4)


def test_engine_greedy_matches_transformers_on_qwen3(tmp_path):
    ref = _save_tiny("qwen3", tmp_path)
    _save_word_tokenizer(tmp_path)
    prompt = [5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 200, 31, 8, 9, 10, 12, 13, 300]  # crosses a KV block
    expected = greedy_tokens(ref, [prompt], [12])[0]
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=128, block_size=16))
    try:
        async def run() -> list[int]:
            out: list[int] = []
            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            async for o in engine.generate(prompt, params, "qwen3-tiny"):
                out += o.deltas[0].token_ids if o.deltas else []
            return out

        assert asyncio.run(run()) == expected
    finally:
        engine.shutdown()


def test_compiled_decode_matches_transformers(tmp_path):
    """--compile: the decode step as one torch.compile graph, batch size 1 and a dynamic batch,
    with requests joining and leaving while the context crosses KV blocks."""
    ref = _save_tiny("llama3-rope-scaling", tmp_path)
    _save_word_tokenizer(tmp_path, eos="t2")  # LlamaConfig's eos: the reference bans it as ignore_eos does
    prompts = [[(7 * i + 3 * j) % 310 + 5 for j in range(n)] for i, n in enumerate([3, 18, 9, 30, 14])]
    new_tokens = [12, 20, 6, 15, 24]
    expected = greedy_tokens(ref, prompts, new_tokens)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=128, compile=True))
    # The warm-up compiled every graph serving needs: any batch size and block-table width reuses them.
    torch.compiler.set_stance("fail_on_recompile")
    try:
        def params(n: int) -> SamplingParams:
            return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        async def run() -> tuple[list[int], list[list[int]]]:
            alone = await collect(engine, prompts[0], params(new_tokens[0]))
            together = await asyncio.gather(
                *(collect(engine, p, params(n), delay=0.02 * i) for i, (p, n) in enumerate(zip(prompts, new_tokens)))
            )
            return alone[0].token_ids, [o[0].token_ids for o in together]

        alone, together = asyncio.run(run())
        assert alone == expected[0]
        assert together == expected
        assert engine.runner.compiled_decode_steps > 0  # the compiled graph ran, not only the eager one
    finally:
        torch.compiler.set_stance("default")
        engine.shutdown()


def test_bucket_sizes():
    assert [bucket(n, 32) for n in (1, 2, 3, 4, 5, 17, 32)] == [1, 2, 4, 4, 8, 32, 32]
    assert bucket(40, 48) == 48 and bucket(3, 2) == 2


def test_padded_decode_matches_transformers(tmp_path):
    """The CUDA-graph path's padding, run eagerly on the CPU: batches padded to powers of two
    (padded rows write into the scratch block), block tables padded in width, same tokens."""
    ref = _save_tiny("qwen2-tied", tmp_path)
    _save_word_tokenizer(tmp_path, eos="t2")
    prompts = [[(5 * i + 11 * j) % 300 + 7 for j in range(n)] for i, n in enumerate([3, 18, 9, 30, 14])]
    new_tokens = [12, 20, 6, 15, 24]
    expected = greedy_tokens(ref, prompts, new_tokens)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=128, max_num_seqs=6))
    runner = engine.runner
    padded = PaddedDecode(runner._decode_eager, runner.device, 6, 128 // runner.block_size,
                          engine.blocks.num_blocks, runner.block_size, use_graphs=False)
    runner._decode = padded  # what a CUDA device replays as graphs, here eager on these shapes
    try:
        async def run() -> list[list[int]]:
            outs = await asyncio.gather(*(
                collect(engine, p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), delay=0.02 * i)
                for i, (p, n) in enumerate(zip(prompts, new_tokens))
            ))
            return [o[0].token_ids for o in outs]

        assert asyncio.run(run()) == expected
        assert padded.slots[5].item() == engine.blocks.num_blocks * runner.block_size  # a padded row
    finally:
        engine.shutdown()


@pytest.mark.parametrize("step_tokens", [512, 100])
def test_long_prompts_match_transformers(step_tokens, tmp_path):
    """Prompts of several CPU attention tiles, whole or in chunks that start mid-tile."""
    ref = _save_tiny("qwen3", tmp_path)
    _save_word_tokenizer(tmp_path, eos="t2")
    prompts = [[(13 * i + 7 * j) % 300 + 5 for j in range(n)] for i, n in enumerate([150, 201])]
    expected = greedy_tokens(ref, prompts, [8] * len(prompts))
    engine = AsyncLLMEngine.from_args(
        EngineArgs(model_dir=str(tmp_path), max_model_len=256, max_num_batched_tokens=step_tokens)
    )
    try:
        async def run() -> list[list[int]]:
            params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
            outs = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
            return [o[0].token_ids for o in outs]

        assert asyncio.run(run()) == expected
    finally:
        engine.shutdown()


def test_tiled_prefill_attention_equals_masked_sdpa():
    from dashchat.engine.native.attention import PagedAttention

    attention = PagedAttention([], block_size=16, scale=0.125)
    gen = torch.Generator().manual_seed(3)
    for t, past in [(1, 0), (64, 0), (150, 0), (70, 90)]:
        q = torch.randn(t, 6, 32, generator=gen)
        keys, values = torch.randn(2, past + t, 32, generator=gen), torch.randn(2, past + t, 32, generator=gen)
        mask = torch.arange(past + t)[None, :] <= torch.arange(past, past + t)[:, None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), keys.repeat_interleave(3, 0), values.repeat_interleave(3, 0), attn_mask=mask, scale=0.125
        ).transpose(0, 1).reshape(t, 6 * 32)
        torch.testing.assert_close(attention._prefill_tiled(q, keys, values, past), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("window", [None, 3])
def test_batched_prefill_attention_equals_one_call_per_chunk(cached, window):
    """The GPU's one-call prefill (block-diagonal causal mask, cached context gathered) against the
    per-chunk path, on a step with decodes, fresh chunks and (cached) chunks continuing a prefix;
    with a sliding window too (Gemma 3), shorter than the chunks and their cached context."""
    from dashchat.engine.native.attention import PagedAttention, PrefillSpan, StepAttentionMetadata

    gen = torch.Generator().manual_seed(5)
    bs, hkv, hq, dim = 4, 2, 6, 16
    cache = [(torch.randn(64 * bs, hkv, dim, generator=gen), torch.randn(64 * bs, hkv, dim, generator=gen))]
    decode_tables = torch.tensor([[40, 41, 0], [50, 51, 52]])
    decode_lens = torch.tensor([6, 11])
    # (chunk length, cached tokens before it, blocks)
    chunks = [(5, 0, [1, 2]), (7, 6, [3, 4, 5, 6]), (1, 9, [7, 8, 9]), (9, 0, [10, 11, 12])]
    if not cached:
        chunks = [(length, 0, blocks) for length, _, blocks in chunks]
    spans, slots = [], [41 * bs + 1, 52 * bs + 2]
    row = 2
    for length, past, blocks in chunks:
        spans.append(PrefillSpan(row, length, past + length, torch.tensor(blocks)))
        slots += [blocks[p // bs] * bs + p % bs for p in range(past, past + length)]
        row += length
    q, k, v = (torch.randn(row, h, dim, generator=gen) for h in (hq, hkv, hkv))
    outs = []
    for batched in (False, True):
        layer_cache = [(cache[0][0].clone(), cache[0][1].clone())]
        attention = PagedAttention(layer_cache, bs, dim**-0.5, batch_prefills=batched, windows=[window])
        attention.begin_step(StepAttentionMetadata(torch.tensor(slots), 2, decode_tables, decode_lens, spans))
        outs.append(attention(0, q, k, v))
        assert batched == (window in attention._prefill_plans)
        if batched:
            assert (attention._prefill_plans[window][0] is None) == (not cached)  # gathers only cached context
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_step_token_budget_defaults_to_512_on_cpu(tmp_path):
    _save_tiny("qwen2-tied", tmp_path)
    _save_word_tokenizer(tmp_path)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), max_model_len=128))
    try:
        assert engine.scheduler.max_num_batched_tokens == 512
    finally:
        engine.shutdown()
