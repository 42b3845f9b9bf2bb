"""Engine-level throughput: dashchat's native engine vs transformers generate vs DashInfer.

One run, same machine, same model, greedy, fixed prompt and output lengths:
  single-stream TTFT and decode tok/s, aggregate tok/s at concurrency 1/8/32.

    python bench/engine.py [--model smollm2-135m-instruct] [--quantization none|int8] [--compile]
                           [--peers transformers,dashinfer] [--device cpu|cuda] [--dtype auto] [--enforce-eager]

Medians over --repeats runs. transformers has no continuous batching: its "concurrency c"
is one static batch of c left-padded prompts (the best one could serve with it), and a second
row shows a server that runs generate() one request at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dashchat.engine.args import EngineArgs  # noqa: E402
from dashchat.engine.native.model_runner import resolve_dtype  # noqa: E402
from dashchat.engine.types import SamplingParams  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402

PROMPT = "Write a detailed story about a robot who learns to paint. Chapter {i}:"
_fresh = itertools.count()


def prompts(tokenizer, n: int, prompt_len: int) -> list[list[int]]:
    """n prompts never sent before: each differs in its first KV block, so no engine's prefix cache
    shortens its prefill (every engine does the same work in every repeat)."""
    out = []
    for _ in range(n):
        ids = tokenizer.encode(PROMPT.format(i=next(_fresh)) + " Once upon a time" * max(64, prompt_len // 2))
        assert len(ids) >= prompt_len, "the prompt text is too short for --prompt-len"
        out.append(ids[:prompt_len])
    return out


async def _one(engine, ids: list[int], new_tokens: int, rid: str) -> tuple[float, float, int]:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    first = None
    count = 0
    async for out in engine.generate(ids, params, rid):
        count += sum(len(d.token_ids) for d in out.deltas)
        if first is None and count:
            first = time.perf_counter()
    return first - start, time.perf_counter() - first, count


async def bench_engine(engine, tokenizer, concurrencies, prompt_len, new_tokens, repeats) -> dict:
    await _one(engine, prompts(tokenizer, 1, prompt_len)[0], 4, "warmup")
    result: dict = {}
    ttfts, decode = [], []
    for r in range(repeats):
        ttft, rest, count = await _one(engine, prompts(tokenizer, 1, prompt_len)[0], new_tokens, f"single-{r}")
        ttfts.append(ttft)
        decode.append((count - 1) / rest)
    result["ttft_ms"] = statistics.median(ttfts) * 1000
    result["decode_tok_s"] = statistics.median(decode)
    for c in concurrencies:
        rates = []
        for r in range(repeats):
            batch = prompts(tokenizer, c, prompt_len)
            start = time.perf_counter()
            outs = await asyncio.gather(*(_one(engine, ids, new_tokens, f"c{c}-{r}-{i}") for i, ids in enumerate(batch)))
            rates.append(sum(o[2] for o in outs) / (time.perf_counter() - start))
        result[f"agg_tok_s_c{c}"] = statistics.median(rates)
    return result


def bench_transformers(model_dir, tokenizer, concurrencies, prompt_len, new_tokens, repeats,
                       device: str = "cpu", dtype: torch.dtype = torch.float32) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()

    def run(batch: list[list[int]], n: int) -> tuple[float, float]:
        width = max(len(b) for b in batch)
        pad = 0
        ids = torch.tensor([[pad] * (width - len(b)) + b for b in batch], device=device)
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch], device=device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            out.cpu()  # waits for the GPU
        return time.perf_counter() - start, n * len(batch)

    run(prompts(tokenizer, 1, prompt_len), 2)
    result: dict = {}
    ttfts = [run(prompts(tokenizer, 1, prompt_len), 1)[0] for _ in range(repeats)]
    fulls = [run(prompts(tokenizer, 1, prompt_len), new_tokens)[0] for _ in range(repeats)]
    result["ttft_ms"] = statistics.median(ttfts) * 1000
    result["decode_tok_s"] = (new_tokens - 1) / (statistics.median(fulls) - statistics.median(ttfts))
    for c in concurrencies:
        rates = []
        for _ in range(repeats):
            secs, toks = run(prompts(tokenizer, c, prompt_len), new_tokens)
            rates.append(toks / secs)
        result[f"agg_tok_s_c{c}"] = statistics.median(rates)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--quantization", default="none")
    ap.add_argument("--compile", action="store_true", help="torch.compile the native engine's decode step")
    ap.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs for the native engine")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peers", default="transformers,dashinfer", help="comma list; empty for none")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", help="auto = float32 on cpu, bfloat16 on cuda (all engines)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    model_dir = str(resolve_model(args.model).path)
    engine_args = EngineArgs(model_dir=model_dir, max_model_len=1024, max_num_seqs=max(concurrencies),
                             quantization=args.quantization, compile=args.compile, device=args.device,
                             enforce_eager=args.enforce_eager,
                             dtype=args.dtype)
    dtype = resolve_dtype(args.dtype, args.device)
    dtype_name = str(dtype).removeprefix("torch.")
    results: dict[str, dict] = {}

    from dashchat.engine.native.llm_engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_args(engine_args)
    tokenizer = engine.tokenizer
    flags = ([] if args.quantization == "none" else [args.quantization]) + (["compile"] if args.compile else [])
    flags += [] if args.device == "cpu" else [args.device, dtype_name, "eager" if args.enforce_eager else "cuda graphs"]
    label = "dashchat" + (f" ({', '.join(flags)})" if flags else "")
    results[label] = asyncio.run(bench_engine(engine, tokenizer, concurrencies, args.prompt_len,
                                              args.new_tokens, args.repeats))
    engine.shutdown()
    print(label, json.dumps(results[label]), flush=True)

    peers = [p for p in args.peers.split(",") if p]
    if "dashinfer" in peers and args.device == "cpu":
        try:
            from dashchat.engine.dashinfer.engine import DashInferEngine

            peer = DashInferEngine.from_args(EngineArgs(model_dir=model_dir, max_model_len=1024,
                                                        max_num_seqs=max(concurrencies)))
        except ImportError as exc:
            print(f"dashinfer skipped: {exc}", flush=True)
        else:
            results["dashinfer 1.3.0 (fp32)"] = asyncio.run(
                bench_engine(peer, tokenizer, concurrencies, args.prompt_len, args.new_tokens, args.repeats))
            peer.shutdown()
            print("dashinfer", json.dumps(results["dashinfer 1.3.0 (fp32)"]), flush=True)
    if "transformers" in peers:
        name = f"transformers generate ({args.device}, {dtype_name})"
        results[name] = row = bench_transformers(model_dir, tokenizer, concurrencies, args.prompt_len,
                                                 args.new_tokens, args.repeats, args.device, dtype)
        print("transformers", json.dumps(row), flush=True)
        # A server built on generate() alone answers one request at a time: its aggregate at any
        # concurrency is one request's rate, derived here from the single-stream numbers.
        per_request = row["ttft_ms"] / 1000 + (args.new_tokens - 1) / row["decode_tok_s"]
        results["transformers generate, one request at a time"] = dict(
            row, **{f"agg_tok_s_c{c}": args.new_tokens / per_request for c in concurrencies})

    cols = ["ttft_ms", "decode_tok_s"] + [f"agg_tok_s_c{c}" for c in concurrencies]
    print(f"\nmodel {args.model}, prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy, "
          f"torch threads {torch.get_num_threads()}, medians of {args.repeats}\n")
    print("| engine | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |")
    base = results[label]
    for name, row in results.items():
        if name != label:
            print(f"\n{label} / {name}: " + ", ".join(
                f"{c} {(row[c] / base[c]) if c == 'ttft_ms' else (base[c] / row[c]):.2f}x" for c in cols))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
