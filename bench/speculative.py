"""Speculative decoding (n-gram lookup) against decoding without it: the same build, the same
run, two engines side by side, rounds alternating which goes first, medians taken.

Through the engine directly (AsyncLLMEngine, GGUF as shipped, greedy):
  edit  one stream of code-editing requests: ~60 lines of Python and a small change asked for,
        the whole file back (300+ tokens). Reports tok/s both ways, the speed-up, the acceptance
        rate (accepted / proposed tokens) and tokens per forward pass of the speculating engine.
  chat  plain chat (a story, nothing to copy), 1, 8 and 32 streams at once, end tokens banned:
        aggregate tok/s both ways. The ratio must stay >= 0.97x for n-gram speculation to be worth
        turning on by default.
  rows  the cost of a decode step by its rows (one sequence, m - 1 proposals), over one row's: the
        step cost table speculative.py plans with (`_CPU_ROW_COST`). During a code edit, every
        --rows-every-th step of the one sequence is re-run with m rows for each m (the proposals
        are filler tokens; a re-run rewrites the same KV slots, and the real step runs last).
  agreement  where speculation is not bit exact (`--dtype bfloat16` on the dequantized weights,
        `--compile`): the greedy answers of the code edits and chat prompts with and without it, how
        many are the same token for token, and at each first difference the top-2 log-prob margin
        the plain run saw there (a near-tie: the verify step's rows are summed in another order).

    python bench/speculative.py [--model qwen2.5-coder-0.5b-instruct] [--rounds 3] [--edits 3] [--only edit|chat|rows|agreement]
        [--streams 1 8 32] [--chat-tokens 128] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.engine.types import SamplingParams
from dashchat.models.resolve import resolve_model

NGRAM = '{"method": "ngram"}'

CODE = '''import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Item:
    name: str
    price: float
    quantity: int = 0
    tags: list[str] = field(default_factory=list)

    def total_value(self) -> float:
        return self.price * self.quantity


class Inventory:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: dict[str, Item] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        data = json.loads(self.path.read_text())
        for entry in data["items"]:
            item = Item(entry["name"], entry["price"], entry.get("quantity", 0), entry.get("tags", []))
            self.items[item.name] = item

    def save(self) -> None:
        data = {"items": [vars(item) for item in self.items.values()]}
        self.path.write_text(json.dumps(data, indent=2))

    def add(self, name: str, price: float, quantity: int = 0) -> Item:
        if name in self.items:
            raise ValueError(f"{name} is already in the inventory")
        item = Item(name, price, quantity)
        self.items[name] = item
        return item

    def remove(self, name: str) -> None:
        del self.items[name]

    def restock(self, name: str, amount: int) -> None:
        if amount <= 0:
            raise ValueError("amount must be positive")
        self.items[name].quantity += amount

    def sell(self, name: str, amount: int) -> float:
        item = self.items[name]
        if item.quantity < amount:
            raise ValueError(f"only {item.quantity} of {name} left")
        item.quantity -= amount
        return item.price * amount

    def total_value(self) -> float:
        return sum(item.total_value() for item in self.items.values())

    def tagged(self, tag: str) -> list[Item]:
        return [item for item in self.items.values() if tag in item.tags]
'''

EDITS = [
    "Rename the method `total_value` to `value` everywhere",
    "Make `remove` raise a KeyError with a clear message when the item is missing",
    "Add a `discount(self, name: str, percent: float)` method to Inventory after `sell`",
]


def chatml(user: str) -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def edit_prompt(change: str) -> str:
    return chatml(f"Here is my Python file:\n```python\n{CODE}```\n{change}, and give me the whole file back.")


CHAT = [chatml(f"Write a short story about a {thing}.") for thing in
        ("lighthouse keeper", "lost robot", "baker in Paris", "dragon who hates gold", "time traveller",
         "city under the sea", "clockmaker", "painter who lost her colours")]


class Counted:
    """An engine and the forward passes (steps) it ran."""

    def __init__(self, engine: AsyncLLMEngine) -> None:
        self.engine, self.steps = engine, 0
        run = engine.runner.run

        def counting(*args, **kw):
            self.steps += 1
            return run(*args, **kw)

        engine.runner.run = counting


async def _one(engine: AsyncLLMEngine, text: str, params: SamplingParams, rid: str) -> int:
    n = 0
    async for out in engine.generate(engine.tokenizer.encode(text), params, rid):
        n += sum(len(d.token_ids) for d in out.deltas)
    return n


_ids = iter(range(10**9))


async def _batch(engine: AsyncLLMEngine, texts: list[str], params: SamplingParams) -> tuple[int, float]:
    start = time.perf_counter()
    counts = await asyncio.gather(*(_one(engine, t, params, f"b{next(_ids)}") for t in texts))
    return sum(counts), time.perf_counter() - start


def bench_edit(engines: dict[str, Counted], rounds: int, edits: int) -> dict:
    params = SamplingParams(max_tokens=700, temperature=0.0)
    speeds: dict[str, list[float]] = {k: [] for k in engines}
    tokens_per_pass: list[float] = []
    spec = engines["ngram"].engine
    before = spec.stats()
    for r in range(rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for change in EDITS[:edits]:
            for name in order:
                counted = engines[name]
                steps = counted.steps
                tokens, seconds = asyncio.run(_batch(counted.engine, [edit_prompt(change)], params))
                speeds[name].append(tokens / seconds)
                if name == "ngram":
                    tokens_per_pass.append(tokens / (counted.steps - steps - 1))  # less the prefill step
    after = spec.stats()
    proposed = after.spec_draft_tokens - before.spec_draft_tokens
    accepted = after.spec_accepted_tokens - before.spec_accepted_tokens
    off, on = statistics.median(speeds["off"]), statistics.median(speeds["ngram"])
    return {"tok_s_off": off, "tok_s_ngram": on, "speedup": on / off, "acceptance": accepted / max(1, proposed),
            "tokens_per_forward_pass": statistics.median(tokens_per_pass), "runs": speeds}


def bench_chat(engines: dict[str, Counted], rounds: int, streams: list[int], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    out = {}
    spec = engines["ngram"].engine
    for n in streams:
        texts = [CHAT[i % len(CHAT)] for i in range(n)]
        speeds: dict[str, list[float]] = {k: [] for k in engines}
        before = spec.stats()
        for r in range(rounds):
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                tokens, seconds = asyncio.run(_batch(engines[name].engine, texts, params))
                speeds[name].append(tokens / seconds)
        off, on = statistics.median(speeds["off"]), statistics.median(speeds["ngram"])
        after = spec.stats()
        out[n] = {"tok_s_off": off, "tok_s_ngram": on, "ratio": on / off,
                  "draft_tokens": after.spec_draft_tokens - before.spec_draft_tokens,
                  "accepted_tokens": after.spec_accepted_tokens - before.spec_accepted_tokens}
    return out


def bench_rows(engine: AsyncLLMEngine, sizes: list[int], every: int) -> dict:
    """Median seconds of a one-sequence decode step of m rows, over one row's."""
    runner, blocks = engine.runner, engine.blocks
    run = runner.run
    times: dict[int, list[float]] = {m: [] for m in sizes}
    count = iter(range(10**9))

    def timed(batch, sampling):
        if len(batch.decodes) == 1 and not batch.prefills and next(count) % every == 0:
            seq = batch.decodes[0]
            real = seq.proposal
            if blocks.allocate(seq, seq.num_tokens + max(sizes)):
                for m in sizes:
                    seq.proposal = [seq.token_ids[-1]] * (m - 1)
                    start = time.perf_counter()
                    run(batch, sampling)
                    times[m].append(time.perf_counter() - start)
                seq.proposal = real
                blocks.trim(seq, seq.num_tokens + len(real))
        return run(batch, sampling)

    runner.run = timed
    try:
        params = SamplingParams(max_tokens=400, temperature=0.0)
        for change in EDITS:
            asyncio.run(_batch(engine, [edit_prompt(change)], params))
    finally:
        runner.run = run
    one = statistics.median(times[1])
    return {m: statistics.median(t) / one for m, t in times.items() if t}


def bench_agreement(engines: dict[str, Counted], new_tokens: int) -> dict:
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=2)

    async def answer(engine: AsyncLLMEngine, text: str):
        tokens, logprobs = [], []
        async for out in engine.generate(engine.tokenizer.encode(text), params, f"a{next(_ids)}"):
            for d in out.deltas:
                tokens += d.token_ids
                logprobs += d.logprobs or []
        return tokens, logprobs

    prompts = [edit_prompt(change) for change in EDITS] + CHAT
    same, differences = 0, []
    for text in prompts:
        plain, plain_lp = asyncio.run(answer(engines["off"].engine, text))
        spec, _ = asyncio.run(answer(engines["ngram"].engine, text))
        if plain == spec:
            same += 1
            continue
        at = next((i for i, (a, b) in enumerate(zip(plain, spec)) if a != b), min(len(plain), len(spec)))
        top = plain_lp[at].top if at < len(plain_lp) else []
        margin = top[0][1] - top[1][1] if len(top) > 1 else float("nan")
        differences.append({"position": at, "top2_margin": margin})
    return {"requests": len(prompts), "identical": same, "differences": differences}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["edit", "chat", "rows", "agreement"], default=None)
    ap.add_argument("--dtype", default=None, help="agreement mode: run the dequantized weights in this dtype")
    ap.add_argument("--compile", action="store_true", help="agreement mode: torch.compile the decode step")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 8, 12, 16, 24, 32, 48],
                    help="rows mode: step widths measured")
    ap.add_argument("--rows-every", type=int, default=8, help="rows mode: measure every n-th step")
    ap.add_argument("--edits", type=int, default=len(EDITS), help="code-edit requests a round (at most 3)")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--chat-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    path = str(resolve_model(args.model).path)
    if args.only == "rows":
        engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=path, quantization="gguf", max_model_len=4096,
                                                     num_threads=args.threads))
        try:
            costs = bench_rows(engine, args.rows, args.rows_every)
        finally:
            engine.shutdown()
        print("step cost by rows (one row = 1): " + ", ".join(f"{m}: {c:.2f}" for m, c in costs.items()))
        if args.json:
            Path(args.json).write_text(json.dumps({"rows": costs, "load": os.getloadavg()}, indent=2))
        return
    weights = {"quantization": "gguf"}
    if args.only == "agreement":
        weights = {"quantization": "none", "dtype": args.dtype or "auto", "compile": args.compile}
    engines = {}
    for name, spec in (("off", None), ("ngram", NGRAM)):
        engines[name] = Counted(AsyncLLMEngine.from_args(EngineArgs(
            model_dir=path, max_model_len=4096, num_threads=args.threads, speculative_config=spec, **weights)))
    results: dict = {"model": args.model, "load_before": os.getloadavg()}
    try:
        if args.only == "agreement":
            results["agreement"] = a = bench_agreement(engines, args.chat_tokens)
            print(f"{args.dtype or 'auto'}{' compiled' if args.compile else ''}: {a['identical']} of "
                  f"{a['requests']} greedy answers identical with and without speculation; first differences "
                  f"(position, plain run's top-2 margin): "
                  + ", ".join(f"{d['position']} ({d['top2_margin']:.3f})" for d in a["differences"]), flush=True)
        if args.only in (None, "edit"):
            results["edit"] = e = bench_edit(engines, args.rounds, args.edits)
            print(f"code edit, one stream: {e['tok_s_off']:.1f} -> {e['tok_s_ngram']:.1f} tok/s "
                  f"({e['speedup']:.2f}x); acceptance {e['acceptance']:.0%}, "
                  f"{e['tokens_per_forward_pass']:.2f} tokens per forward pass", flush=True)
        if args.only in (None, "chat"):
            results["chat"] = c = bench_chat(engines, args.rounds, args.streams, args.chat_tokens)
            for n, row in c.items():
                print(f"chat, {n} stream(s): {row['tok_s_off']:.1f} -> {row['tok_s_ngram']:.1f} tok/s "
                      f"({row['ratio']:.3f}x); proposed {row['draft_tokens']}, accepted {row['accepted_tokens']}",
                      flush=True)
    finally:
        for counted in engines.values():
            counted.engine.shutdown()
    results["load_after"] = os.getloadavg()
    print(f"load average before / after: {results['load_before'][0]:.1f} / {results['load_after'][0]:.1f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
