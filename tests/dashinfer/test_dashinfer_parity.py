"""DashInfer gives the tokens of the native engine and of transformers: greedy, stop ids, eos, logprobs, seeds."""

from __future__ import annotations

import asyncio
import math

import pytest
from dashinfer_helpers import (
    HAVE_DASHINFER,
    MAX_MODEL_LEN,
    SKIP_REASON,
    collect,
    greedy,
    run,
    wait_idle,
)
from engine_helpers import transformers_greedy

from dashchat.engine.args import EngineArgs
from dashchat.engine.types import SamplingParams, UnsupportedFeature

if not HAVE_DASHINFER:
    pytest.skip(SKIP_REASON, allow_module_level=True)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",  # the model wants eos here
    "The quick brown fox jumps over the lazy dog. " * 6 + "Then",
]
NEW_TOKENS = 16
CHAT = PROMPTS[3]


@pytest.fixture(scope="module")
def native(smollm2_dir: str):
    from dashchat.engine.native.llm_engine import AsyncLLMEngine

    eng = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=MAX_MODEL_LEN))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def reference(smollm2_dir: str, engine) -> list[list[int]]:
    return transformers_greedy(smollm2_dir, engine.tokenizer, PROMPTS, NEW_TOKENS)


def test_greedy_matches_native_and_transformers(engine, native, reference):
    for prompt, ref in zip(PROMPTS, reference):
        ids = engine.tokenizer.encode(prompt)
        got = run(engine, ids, greedy(NEW_TOKENS))[0]
        assert got.token_ids == ref, prompt
        assert got.finish_reason == "length"
        assert run(native, ids, greedy(NEW_TOKENS))[0].token_ids == ref, prompt


def test_concurrent_requests_match_alone(engine, reference):
    async def crowd():
        return await asyncio.gather(*(
            collect(engine, engine.tokenizer.encode(p), greedy(NEW_TOKENS), delay=0.02 * i)
            for i, p in enumerate(PROMPTS)
        ))

    for prompt, ref, got in zip(PROMPTS, reference, asyncio.run(crowd())):  # 5 requests, 4 slots
        assert got[0].token_ids == ref, prompt


def test_eos_and_stop_ids_end_like_native(engine, native, reference):
    chat = engine.tokenizer.encode(CHAT)
    plain = SamplingParams(max_tokens=40, temperature=0.0)
    got, want = run(engine, chat, plain)[0], run(native, chat, plain)[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
    assert got.token_ids[-1] in engine.tokenizer.eos_token_ids  # the eos is part of the output

    prompt = engine.tokenizer.encode(PROMPTS[0])
    stop_at = reference[0][3]
    got = run(engine, prompt, greedy(NEW_TOKENS, stop_token_ids=[stop_at]))[0]
    assert got.token_ids == reference[0][: reference[0].index(stop_at) + 1]
    assert got.finish_reason == "stop"
    # a stop id that ends the prompt must not end the output (DashInfer's own stop check looks there)
    got = run(engine, prompt, greedy(4, stop_token_ids=[prompt[-1]]))[0]
    assert got.token_ids == reference[0][:4]


def test_min_tokens_holds_back_eos(engine, monkeypatch):
    chat = engine.tokenizer.encode(CHAT)
    with pytest.raises(UnsupportedFeature, match="min_tokens"):  # SmolLM2 has two eos ids; DashInfer holds one
        run(engine, chat, SamplingParams(max_tokens=40, temperature=0.0, min_tokens=3))
    monkeypatch.setattr(engine.tokenizer, "eos_token_ids", {engine.tokenizer.eos_token_id})
    free = run(engine, chat, SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert free.finish_reason == "stop"
    held = run(engine, chat, SamplingParams(max_tokens=40, temperature=0.0, min_tokens=len(free.token_ids) + 2))[0]
    assert held.token_ids[: len(free.token_ids) - 1] == free.token_ids[:-1]
    assert engine.tokenizer.eos_token_id not in held.token_ids[: len(free.token_ids) + 2]


def test_logprobs_match_native(engine, native):
    prompt = engine.tokenizer.encode(PROMPTS[1])
    got = run(engine, prompt, greedy(6, logprobs=3))[0]
    want = run(native, prompt, greedy(6, logprobs=3))[0]
    assert got.token_ids == want.token_ids
    for g, w in zip(got.logprobs, want.logprobs):
        assert g.token_id == w.token_id
        assert math.isclose(g.logprob, w.logprob, abs_tol=2e-3)
        assert [t for t, _ in g.top] == [t for t, _ in w.top]


def test_seeded_sampling_reproduces_and_n_choices_differ(engine):
    prompt = engine.tokenizer.encode("Write a short poem about the sea.")
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234)
    # alone each time: DashInfer's batched matmuls round differently, which can flip a sampled token
    assert wait_idle(engine)
    first = run(engine, prompt, params)[0].token_ids
    assert wait_idle(engine)
    assert run(engine, prompt, params)[0].token_ids == first
    both = run(engine, prompt, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.95, seed=1234, n=2))
    assert sorted(both) == [0, 1]
    assert both[0].token_ids != both[1].token_ids  # choice i draws with seed + i
    # ignore_eos: two draws that both end at once on eos would look alike whatever their seeds
    unseeded = [run(engine, prompt, SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True))[0].token_ids
                for _ in range(2)]
    assert unseeded[0] != unseeded[1]  # DashInfer's default seed is fixed: the engine must draw one
