"""The server's own cost per streamed token, against the engine alone (the aim: < 5% at concurrency 32).

A: the engine alone, in-process: `concurrency` requests of `tokens` tokens each (ignore_eos),
   all at once; decode throughput = generated tokens / wall time.
B: the same requests through the real server (subprocess) as SSE streams, from clients in
   this process that only count bytes and events (no JSON parsing: keep the client cheap).
overhead = 1 - B / A. Runs A, B, A, B by default and reports each pair. Wall-clock throughput
is noisy on a shared 2-core machine, so B also reports CPU time from /proc: the server's event-
loop thread (HTTP, detokenizing, JSON, SSE: everything that is not the engine) against all its
other threads (the engine step thread and torch's workers), which other load does not skew.

    python bench/server_overhead.py [--model-path smollm2-135m-instruct] [--concurrency 32] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "server"))
from server_proc import ServerProcess

from dashchat.engine.args import EngineArgs
from dashchat.engine.types import SamplingParams
from dashchat.models.resolve import resolve_model

PROMPT = "Write a long story about a lighthouse keeper."


def engine_alone(model_dir: str, args: argparse.Namespace) -> float:
    from dashchat.engine.native.llm_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_args(EngineArgs(
        model_dir=model_dir, device="cpu", max_model_len=args.max_model_len, max_num_seqs=args.concurrency,
        kv_cache_memory_gb=args.kv_gb))
    prompt = engine.tokenizer.encode(PROMPT, add_special_tokens=True)  # as /v1/completions tokenizes it

    async def one() -> int:
        n = 0
        params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(prompt, params, uuid.uuid4().hex):
            n += sum(len(d.token_ids) for d in out.deltas)
        return n

    async def run() -> tuple[int, float]:
        await one()  # warm-up
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one() for _ in range(args.concurrency)))
        return sum(counts), time.perf_counter() - t0

    try:
        total, elapsed = asyncio.run(run())
    finally:
        engine.shutdown()
    return total / elapsed


def thread_cpu(pid: int) -> tuple[float, float]:
    """(CPU seconds of the main thread, of all other threads) of a process."""
    tick = 100.0  # USER_HZ
    main = rest = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if int(task.name) == pid:
            main += cpu
        else:
            rest += cpu
    return main, rest


def through_server(srv: ServerProcess, model: str, args: argparse.Namespace) -> tuple[float, float]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}

    async def one(c: httpx.AsyncClient) -> int:
        events = 0
        async with c.stream("POST", "/v1/completions", json=body) as r:
            async for chunk in r.aiter_bytes():
                events += chunk.count(b"data: ")
        return events - 1  # [DONE]

    cpu: list[tuple[float, float]] = []

    async def run() -> tuple[int, float]:
        limits = httpx.Limits(max_connections=args.concurrency + 4)
        async with httpx.AsyncClient(base_url=srv.base_url, timeout=600, limits=limits) as c:
            await one(c)
            cpu.append(thread_cpu(srv.proc.pid))
            t0 = time.perf_counter()
            await asyncio.gather(*(one(c) for _ in range(args.concurrency)))
            elapsed = time.perf_counter() - t0
            cpu.append(thread_cpu(srv.proc.pid))
            return args.concurrency * args.tokens, elapsed

    total, elapsed = asyncio.run(run())
    loop_cpu = cpu[1][0] - cpu[0][0]
    engine_cpu = cpu[1][1] - cpu[0][1]
    return total / elapsed, loop_cpu / engine_cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default="smollm2-135m-instruct")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--kv-gb", type=float, default=0.5)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    resolved = resolve_model(args.model_path)
    rows = []
    for _ in range(args.rounds):
        a = engine_alone(str(resolved.path), args)
        srv = ServerProcess("--model-path", args.model_path, "--device", "cpu", "--max-model-len",
                            str(args.max_model_len), "--max-num-seqs", str(args.concurrency),
                            "--kv-cache-memory", str(args.kv_gb), "--log-level", "warning").wait_ready()
        try:
            b, cpu_ratio = through_server(srv, resolved.name, args)
        finally:
            srv.stop()
        rows.append({"engine_tok_s": round(a, 1), "server_tok_s": round(b, 1), "overhead": round(1 - b / a, 4),
                     "loop_cpu_over_engine_cpu": round(cpu_ratio, 4)})
        print(json.dumps(rows[-1]), flush=True)
    mean = sum(r["overhead"] for r in rows) / len(rows)
    cpu_mean = sum(r["loop_cpu_over_engine_cpu"] for r in rows) / len(rows)
    print(f"concurrency {args.concurrency}, {args.tokens} tokens each, {len(rows)} rounds: throughput loss "
          f"{mean * 100:.1f}% (wall clock, noisy); server loop CPU = {cpu_mean * 100:.1f}% of engine CPU")
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "server_overhead.json").write_text(json.dumps(
        {"args": vars(args), "rounds": rows, "throughput_loss": mean, "loop_cpu_over_engine_cpu": cpu_mean}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
