"""Tensor parallelism: one model at 1 and at N ranks, step time split into compute and collectives.

    python bench/tensor_parallel.py [--model qwen2.5-coder-0.5b-instruct] [--ranks 1 2] [--batch 1 8]
                                    [--new-tokens 48] [--repeats 3] [--device cpu|cuda] [--compile]

For each rank count and batch size: B greedy requests of --new-tokens decode together; the decode
phase's time per step, and of it the time rank 0 spent in collectives (host time: on CUDA that is
launches and waits, on CPU the gloo transfers themselves). Rank counts alternate round by round;
medians over --repeats. On CPU every rank pins itself to its share of the cores, so N ranks on one
machine split the same cores N ways: the figure that carries over to a multi-GPU host is the
collective share of a step, not the step time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashchat.engine.args import EngineArgs  # noqa: E402
from dashchat.engine.native.llm_engine import AsyncLLMEngine  # noqa: E402
from dashchat.engine.types import SamplingParams  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402

PROMPT = "Write a detailed story about a robot who learns to paint. Chapter {i}:"


async def decode_round(engine: AsyncLLMEngine, batch: int, new_tokens: int, round_no: int) -> tuple[float, float, int]:
    """(decode seconds, rank-0 collective seconds during decode, decode steps) for one batch."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    prompts = [engine.tokenizer.encode(PROMPT.format(i=f"{round_no}-{i}")) for i in range(batch)]
    started = 0  # requests past their prefill

    async def one(ids: list[int], rid: str) -> None:
        nonlocal started
        seen = False
        async for out in engine.generate(ids, params, rid):
            if not seen and out.deltas and out.deltas[0].token_ids:
                seen, started = True, started + 1

    # Prefill every prompt first, then time the decode steps only.
    tasks = [asyncio.create_task(one(p, f"r{round_no}-{i}")) for i, p in enumerate(prompts)]
    while started < batch:
        await asyncio.sleep(0.001)
    start, coll0 = time.perf_counter(), engine.stats().collective_seconds
    await asyncio.gather(*tasks)
    return time.perf_counter() - start, engine.stats().collective_seconds - coll0, new_tokens - 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    model_dir = str(resolve_model(args.model).path)
    results: dict[tuple[int, int], list[tuple[float, float, int]]] = {}
    for repeat in range(args.repeats):
        order = args.ranks if repeat % 2 == 0 else list(reversed(args.ranks))
        for ranks in order:
            engine = AsyncLLMEngine.from_args(EngineArgs(
                model_dir=model_dir, device=args.device, device_ids=tuple(range(ranks)), max_model_len=512,
                kv_cache_memory_gb=0.25, compile=args.compile,
            ))
            try:
                for batch in args.batch:
                    results.setdefault((ranks, batch), []).append(
                        asyncio.run(decode_round(engine, batch, args.new_tokens, repeat)))
            finally:
                engine.shutdown()
    print(f"model {args.model} · {args.device} · greedy, {args.new_tokens} tokens per request · "
          f"medians of {args.repeats} alternating rounds")
    print("| ranks | batch | ms / decode step | of it in collectives | collective share | tok/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for (ranks, batch), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        step_ms = statistics.median(t / steps * 1000 for t, _, steps in runs)
        coll_ms = statistics.median(c / steps * 1000 for _, c, steps in runs)
        tok_s = statistics.median(batch * steps / t for t, _, steps in runs)
        print(f"| {ranks} | {batch} | {step_ms:.1f} | {coll_ms:.1f} | {coll_ms / step_ms:.0%} | {tok_s:.1f} |")


if __name__ == "__main__":
    main()
