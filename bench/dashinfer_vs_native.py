"""Single-stream TTFT and decode tok/s: dashchat's native engine vs DashInfer, same model, one run.

    python bench/dashinfer_vs_native.py [--model smollm2-135m-instruct] [--rounds 2] [--repeats 3]

Each engine runs in a subprocess of its own (idle OpenMP threads of one engine would otherwise
steal cores from the other), alternating native, dashinfer, native, ... for --rounds rounds, so
background load hits both alike. Greedy, ignore_eos, a fixed prompt with a fresh last token per
repeat. Prints medians over all repeats.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashchat.engine.args import EngineArgs
from dashchat.engine.types import SamplingParams
from dashchat.models.resolve import resolve_model

PROMPT = "Write a detailed story about a robot who learns to paint. Once upon a time" + " there was a robot" * 40


async def _one(engine, ids: list[int], new_tokens: int, rid: str) -> tuple[float, float]:
    """(TTFT in s, decode tok/s after the first token)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    async for out in engine.generate(ids, params, rid):
        n = sum(len(d.token_ids) for d in out.deltas)
        if n and not count:
            first = time.perf_counter()
        count += n
        last = time.perf_counter()
    return first - start, (count - 1) / (last - first)


def measure(engine_name: str, model: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    model_dir = str(resolve_model(model).path)
    args = EngineArgs(model_dir=model_dir, max_model_len=prompt_len + new_tokens + 64, max_num_seqs=4)
    t0 = time.perf_counter()
    if engine_name == "native":
        from dashchat.engine.native.llm_engine import AsyncLLMEngine

        engine = AsyncLLMEngine.from_args(args)
    else:
        from dashchat.engine.dashinfer.engine import DashInferEngine

        engine = DashInferEngine.from_args(args)
    load_s = time.perf_counter() - t0
    ids = engine.tokenizer.encode(PROMPT)[:prompt_len]
    asyncio.run(_one(engine, ids, 8, "warmup"))
    ttft, tps = [], []
    for r in range(repeats):
        ids[-1] = 1000 + r  # a fresh last token: no prefix-cache hit on the whole prompt
        a, b = asyncio.run(_one(engine, ids, new_tokens, f"r{r}"))
        ttft.append(a)
        tps.append(b)
    engine.shutdown()
    return {"load_s": load_s, "ttft_ms": [x * 1e3 for x in ttft], "decode_tok_s": tps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--child", choices=["native", "dashinfer"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.prompt_len, args.new_tokens, args.repeats)))
        return

    runs: dict[str, dict[str, list[float]]] = {"native": {}, "dashinfer": {}}
    for _ in range(args.rounds):
        for name, acc in runs.items():
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, "--model", args.model, "--prompt-len",
                 str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)],
                check=True, capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1]
            for key, val in json.loads(out).items():
                acc.setdefault(key, []).extend(val if isinstance(val, list) else [val])
            print(name, out, flush=True)

    print(f"\n{args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy, single stream, "
          f"medians of {args.rounds * args.repeats} runs ({args.rounds} loads)\n")
    print("| engine | TTFT ms | decode tok/s | load s |")
    print("|---|---:|---:|---:|")
    for name, r in runs.items():
        print(f"| {name} | {statistics.median(r['ttft_ms']):.1f} | {statistics.median(r['decode_tok_s']):.1f} "
              f"| {statistics.median(r['load_s']):.1f} |")


if __name__ == "__main__":
    main()
