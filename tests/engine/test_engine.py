"""The native engine against transformers' reference, alone and batched, and its bookkeeping."""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from engine_helpers import collect, transformers_greedy

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import EngineError, NotReady, PromptTooLong, SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "Python is a programming language that",
    "The quick brown fox jumps over the lazy dog. " * 6 + "Then",  # spans several KV blocks
    "日本の首都は",
]
NEW_TOKENS = 20


def greedy(max_tokens: int = NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def engine(smollm2_dir: str):
    eng = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=1024, max_num_batched_tokens=64))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(smollm2_dir: str, engine: AsyncLLMEngine) -> list[list[int]]:
    return transformers_greedy(smollm2_dir, engine.tokenizer, PROMPTS, NEW_TOKENS)


def test_greedy_matches_transformers_alone(engine, reference):
    assert engine.runner.attention.decode_kernel  # the C kernels are what these tests check on CPU
    for prompt, ref in zip(PROMPTS, reference):
        got = asyncio.run(collect(engine, engine.tokenizer.encode(prompt), greedy()))
        assert got[0].token_ids == ref, prompt
        assert got[0].finish_reason == "length"


def test_greedy_matches_transformers_staggered_batch(engine, reference):
    async def run():
        return await asyncio.gather(
            *(collect(engine, engine.tokenizer.encode(p), greedy(), delay=0.03 * i) for i, p in enumerate(PROMPTS))
        )

    for prompt, ref, got in zip(PROMPTS, reference, asyncio.run(run())):
        assert got[0].token_ids == ref, prompt


def test_greedy_matches_transformers_without_cpu_kernels(smollm2_dir, reference, monkeypatch):
    """Where no C compiler is found (or DASHCHAT_CPU_KERNELS=0) PyTorch's ops do the work: same tokens."""
    from dashchat.engine.cpu import linear as cpu_linear, ops as cpu_ops
    from dashchat.engine.native import attention

    for module in (attention, cpu_linear, cpu_ops):
        monkeypatch.setattr(module, "kernel_library", lambda: None)
    eng = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=1024, max_num_batched_tokens=64))
    try:
        assert not eng.runner.attention.decode_kernel
        assert not any(type(m).__name__ == "KernelRMSNorm" for m in eng.runner.model.modules())

        async def run():
            return await asyncio.gather(
                *(collect(eng, eng.tokenizer.encode(p), greedy(), delay=0.03 * i) for i, p in enumerate(PROMPTS))
            )

        for prompt, ref, got in zip(PROMPTS, reference, asyncio.run(run())):
            assert got[0].token_ids == ref, prompt
    finally:
        eng.shutdown()


def test_prefix_cache_reuses_shared_prompt(engine):
    prompt = engine.tokenizer.encode("You are a helpful assistant. " * 10 + "Hello")
    first = asyncio.run(collect(engine, prompt, greedy(8)))
    hits_before = engine.stats().prefix_cache_hits
    second = asyncio.run(collect(engine, prompt, greedy(8)))
    assert engine.stats().prefix_cache_hits - hits_before >= 16 * ((len(prompt) - 1) // 16)
    assert first[0].token_ids == second[0].token_ids


def test_prefix_cache_collision_never_mixes_prompts(engine, reference, monkeypatch):
    """Every block digest forced equal: the second prompt finds a cached block under its key, whose
    tokens are another prompt's; it must recompute and give exactly the reference tokens."""
    from dashchat.engine.native import block_manager

    monkeypatch.setattr(block_manager, "block_digest", lambda parent, tokens: b"\0" * 32)
    other = engine.tokenizer.encode("Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 4)
    asyncio.run(collect(engine, other, greedy(4)))  # its blocks are now cached under the one key
    hits_before = engine.stats().prefix_cache_hits
    got = asyncio.run(collect(engine, engine.tokenizer.encode(PROMPTS[6]), greedy()))
    assert engine.stats().prefix_cache_hits == hits_before
    assert got[0].token_ids == reference[6]


def test_seed_reproduces_whatever_the_batch(engine):
    prompt = engine.tokenizer.encode("Write a short poem about the sea.")
    params = dict(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    alone = asyncio.run(collect(engine, prompt, SamplingParams(**params)))

    async def crowded():
        others = [
            collect(engine, engine.tokenizer.encode(p), SamplingParams(max_tokens=24, temperature=1.2))
            for p in PROMPTS[:4]
        ]
        results = await asyncio.gather(collect(engine, prompt, SamplingParams(**params), delay=0.05), *others)
        return results[0]

    assert asyncio.run(crowded())[0].token_ids == alone[0].token_ids
    other_seed = asyncio.run(collect(engine, prompt, SamplingParams(**{**params, "seed": 99})))
    assert other_seed[0].token_ids != alone[0].token_ids


def test_stop_token_ids_end_the_request(engine, reference):
    prompt = engine.tokenizer.encode(PROMPTS[0])
    stop_at = reference[0][3]
    got = asyncio.run(collect(engine, prompt, greedy(stop_token_ids=[stop_at])))
    assert got[0].token_ids == reference[0][: reference[0].index(stop_at) + 1]
    assert got[0].finish_reason == "stop"


def test_n_choices_share_the_prompt(engine, reference):
    prompt = engine.tokenizer.encode(PROMPTS[6])
    got = asyncio.run(collect(engine, prompt, greedy(n=3)))
    assert sorted(got) == [0, 1, 2]
    for choice in got.values():
        assert choice.token_ids == reference[6]
        assert choice.finish_reason == "length"


def test_logprobs_are_consistent(engine):
    prompt = engine.tokenizer.encode(PROMPTS[1])
    got = asyncio.run(collect(engine, prompt, greedy(6, logprobs=5)))[0]
    assert len(got.logprobs) == 6
    for tok, lp in zip(got.token_ids, got.logprobs):
        assert lp.token_id == tok
        assert len(lp.top) == 5 and lp.top[0][0] == tok  # greedy picks the best
        assert math.isclose(lp.logprob, lp.top[0][1], rel_tol=1e-5)
        assert sum(math.exp(v) for _, v in lp.top) <= 1.0 + 1e-4


def test_abort_frees_blocks(engine):
    async def run():
        stream = engine.generate(engine.tokenizer.encode(PROMPTS[2]), greedy(500), "abort-me")
        async for out in stream:
            if sum(len(d.token_ids) for d in out.deltas):
                break
        await stream.aclose()  # the client went away
        for _ in range(100):
            await asyncio.sleep(0.02)
            if engine.stats().num_running == 0:
                break

    asyncio.run(run())
    stats = engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.kv_blocks_used == 0  # freed blocks stay cached but are free


def test_prompt_too_long_is_refused(engine):
    async def run():
        async for _ in engine.generate([1] * 1000, SamplingParams(max_tokens=100), "too-long"):
            pass

    with pytest.raises(PromptTooLong):
        asyncio.run(run())


def test_failing_logits_processor_fails_only_its_request(engine, reference):
    class Broken:
        def __call__(self, output, logits):
            raise RuntimeError("boom")

    async def run():
        bad = collect(engine, engine.tokenizer.encode(PROMPTS[3]), greedy(logits_processor_factories=[Broken]))
        good = collect(engine, engine.tokenizer.encode(PROMPTS[0]), greedy())
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(run())
    assert isinstance(bad, EngineError)
    assert good[0].token_ids == reference[0]


def test_failing_processor_leaves_a_biased_neighbour_untouched(engine):
    """The neighbour sampled before the failing row had its bias and penalty written into the step's
    logits; the row-by-row retry must not apply them a second time."""
    class Broken:
        def __call__(self, output, logits):
            raise RuntimeError("boom")

    prompt = engine.tokenizer.encode(PROMPTS[0])
    alone = asyncio.run(collect(engine, prompt, greedy(1)))[0].token_ids[0]
    edits = dict(logit_bias={alone: -3.0, 13: 4.0}, repetition_penalty=1.3, logprobs=5)
    expected = asyncio.run(collect(engine, prompt, greedy(3, **edits)))[0]

    async def run():
        neighbour = collect(engine, prompt, greedy(3, **edits))  # admitted first: its row comes first
        bad = collect(engine, engine.tokenizer.encode(PROMPTS[3]), greedy(logits_processor_factories=[Broken]))
        return await asyncio.gather(neighbour, bad, return_exceptions=True)

    got, bad = asyncio.run(run())
    assert isinstance(bad, EngineError)
    assert got[0].token_ids == expected.token_ids
    for lp, ref in zip(got[0].logprobs, expected.logprobs):
        assert [t for t, _ in lp.top] == [t for t, _ in ref.top]
        assert all(math.isclose(v, r, abs_tol=1e-3) for (_, v), (_, r) in zip(lp.top, ref.top))


def test_a_not_ready_processor_waits_while_the_batch_decodes(engine, reference):
    """A processor whose grammar still compiles says NotReady: its sequence gets no token for those
    steps (and then exactly the tokens it would have had), the other request goes on meanwhile."""
    order: list[str] = []

    class CompilingFor20Steps:
        def __init__(self):
            self.calls = 0

        def __call__(self, output, logits):
            self.calls += 1
            if self.calls <= 20:
                raise NotReady("compiling")
            return logits

    async def run(name, prompt, params):
        tokens = []
        async for out in engine.generate(engine.tokenizer.encode(prompt), params, f"{name}-{id(params)}"):
            for d in out.deltas:
                tokens += d.token_ids
                order.extend([name] * len(d.token_ids))
        return tokens

    async def both():
        return await asyncio.gather(run("waiting", PROMPTS[0], greedy(logits_processor_factories=[CompilingFor20Steps])),
                                    run("other", PROMPTS[1], greedy()))

    waiting, other = asyncio.run(both())
    assert waiting == reference[0] and other == reference[1]
    assert order.index("waiting") >= 10, order  # the other stream's tokens came while it waited


def test_tiny_kv_cache_preempts_and_still_finishes_right(smollm2_dir, reference):
    # 8 blocks of 16 tokens: not enough for all prompts at once, enough for any one.
    eng = AsyncLLMEngine.from_args(
        EngineArgs(
            model_dir=smollm2_dir, max_model_len=128, kv_cache_memory_gb=8 * 16 * 46080 / 2**30,
            max_num_batched_tokens=64,
        )
    )
    try:
        assert eng.blocks.num_blocks == 8

        async def run():
            return await asyncio.gather(*(collect(eng, eng.tokenizer.encode(p), greedy()) for p in PROMPTS))

        start = time.monotonic()
        results = asyncio.run(asyncio.wait_for(run(), timeout=300))
        assert time.monotonic() - start < 300
        for prompt, ref, got in zip(PROMPTS, reference, results):
            assert got[0].token_ids == ref, prompt
        assert eng.stats().num_preemptions > 0
        assert eng.stats().kv_blocks_used == 0
    finally:
        eng.shutdown()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_stays_close_to_float32(smollm2_dir, engine, reference, quantization):
    """Int8 (per-token int8 activations) and int4 (groups of 32, bfloat16 activations): same
    greedy text on most prompts."""
    eng = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=1024, quantization=quantization))
    try:
        async def run():
            return await asyncio.gather(*(collect(eng, eng.tokenizer.encode(p), greedy(8)) for p in PROMPTS))

        results = asyncio.run(run())
        same = sum(got[0].token_ids == ref[:8] for got, ref in zip(results, reference))
        assert same >= len(PROMPTS) // 2, same
        if quantization == "int4":
            return
        # per-token activation scales: a request's tokens do not depend on its batch mates
        alone = asyncio.run(collect(eng, eng.tokenizer.encode(PROMPTS[0]), greedy(8)))
        assert alone[0].token_ids == results[0][0].token_ids
    finally:
        eng.shutdown()


def test_int8_cache_reloads_the_same_model(smollm2_dir, tmp_path, monkeypatch):
    """The second start loads the cached int8 weights and computes exactly what the first did."""
    monkeypatch.setenv("DASHCHAT_CACHE", str(tmp_path))
    outputs = []
    for _ in range(2):
        eng = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=256, quantization="int8"))
        try:
            got = asyncio.run(collect(eng, eng.tokenizer.encode(PROMPTS[2]), greedy(8, logprobs=2)))[0]
            outputs.append((got.token_ids, [lp.logprob for lp in got.logprobs]))
        finally:
            eng.shutdown()
        assert len(list((tmp_path / "int8").glob("*.safetensors"))) == 1
    assert outputs[0] == outputs[1]


def test_extreme_sampling_parameters_never_fail(engine):
    """A top_p that underflows float32, a denormal penalty: the request still gets tokens."""
    prompt = engine.tokenizer.encode(PROMPTS[0])
    for params in (
        SamplingParams(max_tokens=4, temperature=1.0, top_p=5e-324),
        SamplingParams(max_tokens=4, temperature=1.0, repetition_penalty=5e-324),
        SamplingParams(max_tokens=4, temperature=2.0, min_p=1.0, top_k=1000000),
        # int64's edges, the largest integers the server lets through (server/validation.py)
        SamplingParams(max_tokens=4, temperature=1.0, seed=2**63 - 1, n=2, top_k=2**63 - 1),
        SamplingParams(max_tokens=4, temperature=1.0, seed=-(2**63), min_tokens=2**63 - 1),
    ):
        got = asyncio.run(collect(engine, prompt, params))
        assert len(got[0].token_ids) == 4, params
