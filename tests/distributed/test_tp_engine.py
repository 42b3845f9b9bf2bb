"""The engine at 2 tensor-parallel ranks gives the tokens it gives at one: concurrent requests
with chunked prefill, a prefix-cache hit, preemption, n > 1 with seeds, logprobs, a constrained
request, --compile, and the int8/int4 CPU paths. Rank 1 is a worker process on this CPU (gloo)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.native.model_runner import ModelRunner
from dashchat.engine.types import SamplingParams
from dashchat.models.config import ModelConfig
from engine_helpers import collect
from tiny_models import save_tiny, save_word_tokenizer

PROMPTS = [[(7 * i + 3 * j) % 310 + 5 for j in range(n)] for i, n in enumerate([3, 40, 9, 70, 14])]
KV_BLOCKS = 14  # of 16 tokens: too few for every request at once, so the scheduler preempts


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("qwen2")
    save_tiny("qwen2-tied", d)  # q/k/v biases, tied head
    save_word_tokenizer(d, eos="t2")
    return str(d)


def even_tokens_only():
    """A stand-in for a grammar: a per-request processor that allows only even token ids."""
    def process(_generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        logits[1::2] = float("-inf")
        return logits
    return process


def kv_gib(model_dir: str, tp: int) -> float:
    per_token = ModelRunner.kv_bytes_per_token(ModelConfig.from_dir(model_dir), torch.float32, tp)
    return KV_BLOCKS * 16 * per_token / 2**30


def run_scenario(model_dir: str, tp: int, **extra) -> tuple[list, dict]:
    engine = AsyncLLMEngine.from_args(EngineArgs(
        model_dir=model_dir, device_ids=tuple(range(tp)), max_model_len=128, max_num_batched_tokens=32,
        kv_cache_memory_gb=kv_gib(model_dir, tp), **extra,
    ))
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=2)
    try:
        async def run():
            # All at once: together they need more KV blocks than there are, whatever the machine's speed.
            together = await asyncio.gather(*(collect(engine, p, greedy) for p in PROMPTS))
            again = await collect(engine, PROMPTS[3], greedy)  # its prompt is in the prefix cache now
            seeded = await collect(engine, PROMPTS[1], SamplingParams(max_tokens=12, n=3, seed=7, ignore_eos=True))
            constrained = await collect(engine, PROMPTS[2], SamplingParams(
                max_tokens=10, temperature=0.0, ignore_eos=True, logits_processor_factories=[even_tokens_only]))
            return together, again, seeded, constrained

        together, again, seeded, constrained = asyncio.run(run())
        stats = engine.stats()
    finally:
        engine.shutdown()
    tokens = [o[0].token_ids for o in together] + [again[0].token_ids]
    top = [[(lp.token_id, [t for t, _ in lp.top]) for lp in o[0].logprobs] for o in together]
    outputs = [tokens, top, [seeded[i].token_ids for i in range(3)], constrained[0].token_ids]
    return outputs, {"preemptions": stats.num_preemptions, "prefix_hits": stats.prefix_cache_hits,
                     "tp": stats.tensor_parallel_size, "collective_s": stats.collective_seconds,
                     "spec_accepted": stats.spec_accepted_tokens}


def test_two_ranks_give_the_tokens_of_one(qwen2_dir):
    one, stats1 = run_scenario(qwen2_dir, 1)
    two, stats2 = run_scenario(qwen2_dir, 2)
    assert two == one
    assert all(t % 2 == 0 for t in two[3])
    for stats in (stats1, stats2):
        assert stats["preemptions"] > 0 and stats["prefix_hits"] > 0
    assert stats2["tp"] == 2 and stats2["collective_s"] > 0 and stats1["collective_s"] == 0


def test_two_ranks_compiled_decode(qwen2_dir):
    """--compile at 2 ranks: the collectives are custom ops inside the compiled decode graph."""
    eager, _ = run_scenario(qwen2_dir, 1)
    compiled, _ = run_scenario(qwen2_dir, 2, compile=True)
    assert compiled[0] == eager[0] and compiled[3] == eager[3]


def test_two_ranks_with_speculation_give_the_tokens_of_one_without(qwen2_dir):
    """n-gram speculation at 2 ranks (asked for: auto picks none there): the verify steps' rows are
    sharded like any other, rejected positions roll back on both ranks, and the greedy tokens, their
    top log-probs and the constrained request equal one rank's without speculation (the seeded
    samples may differ: speculation draws them another way)."""
    plain, _ = run_scenario(qwen2_dir, 1)
    spec, stats = run_scenario(qwen2_dir, 2, speculative_config='{"method": "ngram"}')
    assert spec[0] == plain[0] and spec[1] == plain[1] and spec[3] == plain[3]
    assert stats["spec_accepted"] > 0 and stats["tp"] == 2 and stats["preemptions"] > 0


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_shards(quantization, qwen2_dir, tmp_path, monkeypatch):
    """Quantized weights are per shard (int8 caches one file per rank). Each rank quantizes its
    own slice, so the tokens may differ from one rank's quantization by rounding; they must stay
    close to it."""
    monkeypatch.setenv("DASHCHAT_CACHE", str(tmp_path))
    one, _ = run_scenario(qwen2_dir, 1, quantization=quantization)
    two, _ = run_scenario(qwen2_dir, 2, quantization=quantization)
    pairs = [(a, b) for x, y in zip(one[0], two[0]) for a, b in zip(x, y)]
    assert sum(a == b for a, b in pairs) >= 0.8 * len(pairs)
    if quantization == "int8":
        assert len(list((tmp_path / "int8").glob("*.safetensors"))) == 3  # whole model, rank 0, rank 1
        again, _ = run_scenario(qwen2_dir, 2, quantization=quantization)  # from the per-rank caches
        assert again == two
