"""Request handling of the DashInfer engine: abort, too-long prompts, unsupported features."""

from __future__ import annotations

import asyncio
import time

import pytest
from dashinfer_helpers import (
    HAVE_DASHINFER,
    MAX_MODEL_LEN,
    SKIP_REASON,
    greedy,
    run,
    wait_idle,
)

from dashchat.engine.types import PromptTooLong, SamplingParams, UnsupportedFeature

if not HAVE_DASHINFER:
    pytest.skip(SKIP_REASON, allow_module_level=True)


def test_closing_the_stream_frees_the_request(engine):
    async def go():
        stream = engine.generate(engine.tokenizer.encode("Once upon a time,"), greedy(200), "close-me")
        async for out in stream:
            if sum(len(d.token_ids) for d in out.deltas):
                break
        await stream.aclose()  # the client went away

    started = time.monotonic()
    asyncio.run(go())
    assert wait_idle(engine)
    assert time.monotonic() - started < 5  # stopped, not run to 200 tokens
    assert run(engine, engine.tokenizer.encode("Hi"), greedy(2))[0].finish_reason == "length"  # still serving


def test_abort_ends_the_stream_with_abort(engine):
    async def go():
        finish = None
        async for out in engine.generate(engine.tokenizer.encode("Once upon a time,"), greedy(200), "abort-me"):
            if sum(len(d.token_ids) for d in out.deltas) and finish is None:
                await engine.abort("abort-me")
            finish = out.deltas[0].finish_reason if out.finished else None
        return finish

    assert asyncio.run(asyncio.wait_for(go(), 10)) == "abort"
    assert wait_idle(engine)


def test_too_long_prompt_is_refused_fast(engine):
    async def go(prompt, params):
        async for _ in engine.generate(prompt, params, "too-long"):
            pass

    started = time.monotonic()
    with pytest.raises(PromptTooLong):
        asyncio.run(go([1] * (MAX_MODEL_LEN + 10), SamplingParams(max_tokens=1)))
    with pytest.raises(PromptTooLong):
        asyncio.run(go([1] * (MAX_MODEL_LEN - 5), SamplingParams(max_tokens=10)))
    with pytest.raises(PromptTooLong):
        asyncio.run(go([], SamplingParams(max_tokens=1)))
    assert time.monotonic() - started < 1
    assert wait_idle(engine)


def test_prompt_at_the_limit_still_gets_its_token(engine):
    prompt = [1] * (MAX_MODEL_LEN - 1)  # DashInfer alone refuses a prompt over engine_max_length - 2
    got = run(engine, prompt, greedy(1))[0]
    assert len(got.token_ids) == 1 and got.finish_reason == "length"


@pytest.mark.parametrize("params, feature", [
    (SamplingParams(logits_processor_factories=[lambda: (lambda ids, row: row)]), "grammar"),
    (SamplingParams(frequency_penalty=0.5), "frequency_penalty"),
    (SamplingParams(min_p=0.1), "min_p"),
    (SamplingParams(logit_bias={5: 2.0}), "logit_bias"),
    (SamplingParams(logprobs=20), "top_logprobs"),
    (SamplingParams(min_tokens=3, stop_token_ids=[13]), "min_tokens"),
])
def test_unsupported_features_are_named(engine, params, feature):
    with pytest.raises(UnsupportedFeature, match=feature) as err:
        run(engine, engine.tokenizer.encode("Hello"), params)
    assert "dashinfer" in str(err.value)


def test_logit_bias_ban_is_honoured(engine):
    prompt = engine.tokenizer.encode("The capital of France is")
    first = run(engine, prompt, greedy(1))[0].token_ids[0]
    banned = run(engine, prompt, greedy(1, logit_bias={first: -100.0}))[0].token_ids[0]
    assert banned != first


def test_queued_requests_can_be_dropped(engine):
    async def go():
        prompt = engine.tokenizer.encode("Once upon a time,")
        streams = [engine.generate(prompt, greedy(200), f"crowd-{i}") for i in range(6)]  # 4 slots
        tasks = [asyncio.ensure_future(s.__anext__()) for s in streams]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()  # a cancelled __anext__ closes its stream (the generator's finally stops it)
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()

    asyncio.run(go())
    assert wait_idle(engine)  # a request stopped while still queued is released too


def test_shutdown_fails_running_and_queued_requests(smollm2_dir):
    from dashchat.engine.args import EngineArgs
    from dashchat.engine.dashinfer.engine import DashInferEngine
    from dashchat.engine.types import EngineError

    eng = DashInferEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=64, max_num_seqs=1))

    async def one(i):
        try:
            async for _ in eng.generate(eng.tokenizer.encode("Hello there"), greedy(50), f"s{i}"):
                pass
        except EngineError as exc:
            return str(exc)
        return "finished"

    async def go():
        tasks = [asyncio.create_task(one(i)) for i in range(2)]  # one runs, one waits
        await asyncio.sleep(0.3)
        await asyncio.get_running_loop().run_in_executor(None, eng.shutdown)
        return await asyncio.wait_for(asyncio.gather(*tasks), 10)

    started = time.monotonic()
    assert asyncio.run(go()) == ["the engine is shutting down"] * 2
    assert time.monotonic() - started < 10
