"""What grammar-constrained requests cost the batch they run in (issue 4's target: a batch is not
slowed more than 10% per constrained request).

Through the engine directly (AsyncLLMEngine, greedy): a batch of 8 requests decoding `--new-tokens`
each, with 0, 1 or 4 of them constrained to a JSON Schema (response_format json_schema), and with
all 8 in tool_choice auto mode whose text never starts a call (the free phase: watched, not masked).
Measured: aggregate decode tok/s once every request has its first token, and the time spent inside
the grammar processors per token (less sensitive to a noisy machine: it is compared with the step
time of the same run). Configurations are interleaved (rotated each round), medians taken.

    python bench/grammar_overhead.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 5] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dashchat.engine.args import EngineArgs  # noqa: E402
from dashchat.engine.types import SamplingParams  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402
from dashchat.server.grammar import GrammarBackend  # noqa: E402

BATCH = 8
PROMPT = "Request {i}: list as many short animal names as you can, as JSON."
# Cannot be complete within the bench's tokens (minItems), so constrained rows decode as long as the rest.
SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "animals": {"type": "array", "items": {"type": "string"}, "minItems": 64}},
    "required": ["title", "animals"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


class _Timed:
    """Wraps a processor factory; records the seconds each processor call takes, per config."""

    def __init__(self, factory: Any) -> None:
        self.factory, self.times = factory, []

    def __call__(self) -> Any:
        proc = self.factory()

        def timed(ids: Any, logits: torch.Tensor) -> torch.Tensor:
            t0 = time.perf_counter()
            row = proc(ids, logits)
            self.times.append(time.perf_counter() - t0)
            return row

        return timed


async def _one(engine: Any, ids: list[int], params: SamplingParams, rid: str) -> list[tuple[float, int]]:
    """(arrival time, number of new tokens) per engine output."""
    events = []
    async for out in engine.generate(ids, params, rid):
        events.append((time.perf_counter(), sum(len(d.token_ids) for d in out.deltas)))
    return events


async def run_batch(engine: Any, prompts: list[list[int]], params: list[SamplingParams], tag: str) -> float:
    """Aggregate decode tok/s: tokens that arrived after the last request's first token, per second."""
    runs = await asyncio.gather(*(_one(engine, ids, p, f"{tag}-{i}") for i, (ids, p) in enumerate(zip(prompts, params))))
    start = max(r[0][0] for r in runs)
    end = max(r[-1][0] for r in runs)
    tokens = sum(n for r in runs for t, n in r if t > start)
    return tokens / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    from dashchat.engine.llm_engine import AsyncLLMEngine

    model_dir = str(resolve_model(args.model).path)
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=model_dir, max_model_len=1024, max_num_seqs=BATCH,
                                                        num_threads=args.threads))
    tok = engine.tokenizer
    backend = GrammarBackend(tok, getattr(engine, "vocab_size", None) or tok.vocab_size)
    schema_factory = backend.json_schema(SCHEMA)  # compiled once here, as the server's cache would
    auto_factory = backend.triggered_tool_calls(TOOLS, parallel=True)
    prompts = [tok.encode(PROMPT.format(i=i)) for i in range(BATCH)]

    timers: dict[str, _Timed] = {}

    def params(name: str, constrained: int, auto: bool = False) -> list[SamplingParams]:
        timer = timers[name] = _Timed(auto_factory if auto else schema_factory)
        out = []
        for i in range(BATCH):
            if i < constrained:  # EOS stays allowed: the grammar decides when the JSON may end
                out.append(SamplingParams(max_tokens=args.new_tokens, temperature=0.0,
                                          logits_processor_factories=[timer]))
            else:
                out.append(SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True,
                                          logits_processor_factories=[timer] if auto else []))
        return out

    configs = {k: params(k, n, auto) for k, n, auto in [
        ("0 of 8 constrained", 0, False), ("1 of 8 constrained", 1, False), ("4 of 8 constrained", 4, False),
        ("8 of 8 auto, free text", 0, True)]}

    async def bench() -> dict[str, list[float]]:
        await run_batch(engine, prompts, params("warmup", BATCH), "warmup")
        rates: dict[str, list[float]] = {k: [] for k in configs}
        names = list(configs)
        for r in range(args.rounds):
            for k in names[r % len(names):] + names[: r % len(names)]:  # rotate the order each round
                rates[k].append(await run_batch(engine, prompts, configs[k], f"r{r}-c{names.index(k)}"))
                print(f"round {r} {k}: {rates[k][-1]:.1f} tok/s", flush=True)
        return rates

    try:
        rates = asyncio.run(bench())
    finally:
        engine.shutdown()
    base = statistics.median(rates["0 of 8 constrained"])
    print(f"\nmodel {args.model}, batch {BATCH}, {args.new_tokens} new tokens, greedy, torch threads "
          f"{torch.get_num_threads()}, medians of {args.rounds} interleaved rounds\n")
    step_ms = BATCH / base * 1000  # one decode step of the unconstrained batch
    print(f"unconstrained batch: {step_ms:.1f} ms per decode step\n")
    print("| batch | decode tok/s (median) | min-max | slowdown | per constrained request "
          "| processor ms/token (median, p90) | processor time / step |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    result = {}
    for k, v in rates.items():
        med = statistics.median(v)
        slow = 1 - med / base
        k_constrained = int(k.split()[0]) if "constrained" in k else 0
        per = f"{slow / k_constrained * 100:.1f}%" if k_constrained else "-"
        t = sorted(timers[k].times) or [0.0]
        p50, p90 = t[len(t) // 2] * 1e3, t[int(len(t) * 0.9)] * 1e3
        rows = k_constrained or (BATCH if "auto" in k else 0)
        share = f"{rows * p50 / step_ms * 100:.1f}%" if rows else "-"
        print(f"| {k} | {med:.1f} | {min(v):.1f}-{max(v):.1f} | {slow * 100:.1f}% | {per} "
              f"| {p50:.3f}, {p90:.3f} | {share} |")
        result[k] = {"median_tok_s": med, "all": v, "slowdown": slow, "processor_ms_p50": p50, "processor_ms_p90": p90}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
