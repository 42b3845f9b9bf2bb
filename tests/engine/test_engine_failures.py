"""Faults injected at each stage of a step: a step's failure fails that step's requests and the
engine serves on; a death of the step thread fails every pending and running request at once,
refuses new ones, turns check_health() (the server's /health) to failed, and logs the cause.
No request ever waits forever: every wait below has a generous deadline that only a hang reaches."""

from __future__ import annotations

import asyncio
import logging

import pytest
from engine_helpers import collect

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import EngineDead, EngineError, SamplingParams

HANG = 120.0  # seconds: reached only if a request was never answered


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture
def engine(smollm2_dir: str):
    # One running sequence at a time: the second request waits in the queue (pending).
    eng = AsyncLLMEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=256, max_num_seqs=1))
    yield eng
    eng.shutdown()


class Injected(RuntimeError):
    pass


def _raising(times: int | None, original=None):
    """A stand-in that raises `times` times (None: always), then calls `original`."""
    left = [times]

    def fault(*args, **kwargs):
        if left[0] is None or left[0] > 0:
            if left[0] is not None:
                left[0] -= 1
            raise Injected("injected fault")
        return original(*args, **kwargs)

    return fault


def _inject(engine: AsyncLLMEngine, stage: str) -> None:
    if stage == "drain inbox":
        engine._drain_inbox = _raising(None)
    elif stage == "schedule":
        engine.scheduler.schedule = _raising(None)
    elif stage == "allocate":
        engine.blocks.allocate = _raising(None)
    elif stage == "fail while failing a step":
        engine.runner.run = _raising(1, engine.runner.run)
        engine._fail = _raising(None)
    elif stage == "model forward":
        engine.runner.run = _raising(1, engine.runner.run)
    elif stage == "sampling":
        engine.sampler.sample = _raising(1, engine.sampler.sample)  # one sequence: no row-by-row retry
    elif stage == "register blocks":
        engine.blocks.register_full_blocks = _raising(1, engine.blocks.register_full_blocks)
    elif stage == "publish":
        engine._publish = _raising(1, engine._publish)
    else:
        raise AssertionError(stage)


async def _outcome(engine: AsyncLLMEngine, prompt: list[int], params: SamplingParams, started: asyncio.Event | None):
    """The request's tokens, or the EngineError it failed with."""
    tokens: list[int] = []
    try:
        async for out in engine.generate(prompt, params, f"req-{id(params)}"):
            tokens += out.deltas[0].token_ids if out.deltas else []
            if started is not None and tokens:
                started.set()
    except EngineError as exc:
        return exc
    return tokens


async def _run_with_fault(engine: AsyncLLMEngine, stage: str):
    prompt = engine.tokenizer.encode("Once upon a time, in a land far away,")
    started = asyncio.Event()
    running = asyncio.create_task(_outcome(engine, prompt, greedy(200), started))
    await asyncio.wait_for(started.wait(), HANG)
    pending = asyncio.create_task(_outcome(engine, prompt, greedy(8), None))
    await asyncio.sleep(0)  # registered before the fault
    assert engine.stats().num_waiting >= 1 or pending.done()
    _inject(engine, stage)
    return await asyncio.wait_for(asyncio.gather(running, pending), HANG)


DEATHS = ["drain inbox", "schedule", "allocate", "fail while failing a step"]
STEP_FAILURES = ["model forward", "sampling", "register blocks", "publish"]


@pytest.mark.parametrize("stage", DEATHS)
def test_step_thread_death_fails_everything_at_once(engine, stage, caplog):
    caplog.set_level(logging.CRITICAL, logger="dashchat.engine.native.llm_engine")
    running, pending = asyncio.run(_run_with_fault(engine, stage))
    assert isinstance(running, EngineDead), running
    assert isinstance(pending, EngineDead), pending
    with pytest.raises(EngineDead):
        engine.check_health()
    # A new request is refused at once instead of waiting for a step that never comes.
    with pytest.raises(EngineDead):
        asyncio.run(asyncio.wait_for(collect(engine, [1, 2, 3], greedy(4)), HANG))
    deaths = [r for r in caplog.records if "step thread died" in r.getMessage()]
    assert deaths and deaths[0].exc_info and isinstance(deaths[0].exc_info[1], Injected)


@pytest.mark.parametrize("stage", STEP_FAILURES)
def test_step_failure_fails_that_step_only(engine, stage):
    running, pending = asyncio.run(_run_with_fault(engine, stage))
    assert isinstance(running, EngineError) and not isinstance(running, EngineDead), running
    assert pending == asyncio.run(collect(engine, engine.tokenizer.encode("Once upon a time, in a land far away,"),
                                          greedy(8)))[0].token_ids
    engine.check_health()  # still alive


def test_closed_event_loop_aborts_only_its_requests(engine):
    """A client's event loop closes with its request in flight: the step thread must not die of the
    RuntimeError call_soon_threadsafe raises; that request is aborted and the engine serves on."""
    prompt = engine.tokenizer.encode("Once upon a time, in a land far away,")
    loop = asyncio.new_event_loop()
    stream = engine.generate(prompt, greedy(200), "orphan")
    loop.run_until_complete(stream.__anext__())  # running: its next outputs go to this loop
    loop.close()
    got = asyncio.run(asyncio.wait_for(collect(engine, prompt, greedy(8)), HANG))
    assert len(got[0].token_ids) == 8
    engine.check_health()
    assert engine.stats().num_running == 0 and engine.stats().kv_blocks_used == 0
