"""Qwen2-VL at 2 tensor-parallel ranks (gloo on this CPU): rank 0 runs the vision tower and sends
the embeddings and three-row M-RoPE positions with the step; the tokens equal transformers'."""

from __future__ import annotations

import asyncio

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import SamplingParams
from engine_helpers import collect
from tiny_qwen2_vl import build_prompt, png, reference_logprobs, save_tiny_vl


def test_two_ranks_with_images_equal_transformers(tmp_path):
    ref = save_tiny_vl("qwen2-vl", tmp_path)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=str(tmp_path), device_ids=(0, 1), max_model_len=256,
                                                 max_num_batched_tokens=32, kv_cache_memory_gb=0.01))
    try:
        prompts = [build_prompt(engine, ["A:", png(112, 84, seed=30), "B:", png(56, 84, seed=31), " same?"]),
                   build_prompt(engine, ["text only, beside the images"])]

        async def run():
            return await asyncio.gather(*(collect(engine, ids, SamplingParams(
                max_tokens=8, temperature=0.0, ignore_eos=True, images=images)) for ids, images in prompts))

        outs = asyncio.run(run())
        assert engine.stats().tensor_parallel_size == 2
    finally:
        engine.shutdown()
    for (ids, images), out in zip(prompts, outs):
        tokens = out[0].token_ids
        expected = reference_logprobs(ref, ids + tokens, images)
        assert tokens == expected[len(ids) - 1 : -1].argmax(-1).tolist()
