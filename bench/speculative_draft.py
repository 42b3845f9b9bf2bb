"""Speculative decoding with a draft model against decoding without it: the same build, the same
run, the engines side by side, rounds alternating their order, medians taken. Greedy, one stream,
through the engine directly (AsyncLLMEngine, GGUF as shipped). No real draft/target pair with one
vocabulary is embedded, so:

  self      acceptance: the target (--model, default the embedded Qwen2.5-Coder-0.5B) drafts for
            itself, whole (every greedy proposal is right: the upper bound), as its first
            --draft-layers layers, and re-quantized smaller (--quantized-draft, a file made with
            llama.cpp's `llama-quantize --allow-requantize MODEL.gguf OUT.gguf Q2_K`). Reports tok/s off / on, acceptance (accepted / proposed tokens),
            tokens per target forward pass and draft forwards per generated token.
  overhead  cost: the default model drafts for a random-weight Qwen2.5-3B-shaped Q4_K_M GGUF (its
            proposals are all wrong: random weights): tok/s off / on is what a useless draft costs.

Self-drafts run "forced": every step proposes num_speculative_tokens (the engine's cost model taken
out), so the draft's acceptance and its full cost show; the engine's own "adaptive" choice counts a
draft forward's cost and would rightly propose nothing with a draft as large as its target. The
overhead set runs both.

    python bench/speculative_draft.py [--only self|overhead] [--rounds 2] [--tokens 150]
        [--draft-layers 12] [--quantized-draft PATH] [--workdir /tmp/dashchat-spec-draft]
        [--threads N] [--json PATH]
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from dashchat.engine.args import EngineArgs  # noqa: E402
from dashchat.engine.native.llm_engine import AsyncLLMEngine  # noqa: E402
from dashchat.engine.types import SamplingParams  # noqa: E402
from dashchat.models.embedded import embedded_gguf  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402
from speculative import CHAT, EDITS, Counted, _batch, edit_prompt  # noqa: E402

DEFAULT = "qwen2.5-coder-0.5b-instruct"


def engine(path: str, draft: str | None, threads: int | None, layers: int | None = None) -> Counted:
    spec = None
    if draft is not None:
        spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 6}
        if layers:
            spec["draft_layers"] = layers
        spec = json.dumps(spec)
    return Counted(AsyncLLMEngine.from_args(EngineArgs(
        model_dir=path, quantization="gguf", max_model_len=2048, num_threads=threads, speculative_config=spec)))


def compare(engines: dict[str, Counted], prompts: list[str], rounds: int, tokens: int) -> dict:
    """Per engine: median tok/s; per speculating engine also acceptance, tokens per target
    forward and draft forwards per token over all its runs."""
    params = SamplingParams(max_tokens=tokens, temperature=0.0)
    speeds = {name: [] for name in engines}
    made = {name: 0 for name in engines}
    steps = {name: 0 for name in engines}
    before = {name: (c.engine.stats(), c.engine.speculator.draft.forwards if c.engine.speculator else 0)
              for name, c in engines.items()}
    for r in range(rounds):
        for prompt in prompts:
            order = list(engines) if r % 2 == 0 else list(reversed(engines))
            for name in order:
                counted = engines[name]
                start_steps = counted.steps
                n, seconds = asyncio.run(_batch(counted.engine, [prompt], params))
                speeds[name].append(n / seconds)
                made[name] += n
                steps[name] += counted.steps - start_steps - 1  # less the prefill step
    out = {}
    for name, counted in engines.items():
        row = {"tok_s": statistics.median(speeds[name]), "runs": speeds[name],
               "tokens_per_forward_pass": made[name] / max(1, steps[name])}
        spec = counted.engine.speculator
        if spec is not None:
            stats, forwards = counted.engine.stats(), spec.draft.forwards
            proposed = stats.spec_draft_tokens - before[name][0].spec_draft_tokens
            row.update(acceptance=(stats.spec_accepted_tokens - before[name][0].spec_accepted_tokens) / max(1, proposed),
                       proposed=proposed, draft_forwards_per_token=(forwards - before[name][1]) / max(1, made[name]))
        out[name] = row
    return out


def show(title: str, rows: dict) -> None:
    off = rows["off"]["tok_s"]
    for name, row in rows.items():
        extra = ""
        if "acceptance" in row:
            extra = (f"  {row['tok_s'] / off:.2f}x, acceptance {row['acceptance']:.0%} of {row['proposed']}, "
                     f"{row['tokens_per_forward_pass']:.2f} tokens/target pass, "
                     f"{row['draft_forwards_per_token']:.2f} draft passes/token")
        print(f"{title} {name:>24}: {row['tok_s']:6.1f} tok/s{extra}", flush=True)


def run_set(path: str, drafts: dict[str, tuple[str, int | None]], prompts: dict[str, list[str]], args,
            modes: tuple[str, ...]) -> dict:
    engines = {"off": engine(path, None, args.threads)}
    try:
        for name, (draft, layers) in drafts.items():
            for mode in modes:
                counted = engine(path, draft, args.threads, layers)
                if mode == "forced":  # every step proposes as many tokens as its rows allow
                    counted.engine.speculator.draft_cost = 0.0
                    counted.engine.speculator.cost = lambda rows: 1.0
                engines[f"{name} {mode}"] = counted
        results = {}
        for title, texts in prompts.items():
            results[title] = compare(engines, texts, args.rounds, args.tokens)
            show(title, results[title])
        return results
    finally:
        for counted in engines.values():
            counted.engine.shutdown()


def random_3b(workdir: Path) -> Path:
    from real_shapes import SHAPES, write_gguf

    path = workdir / "qwen2.5-3b-Q4_K_M.gguf"
    if not path.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_gguf(path.with_suffix(".part"), SHAPES["qwen2.5-3b"], "Q4_K_M", embedded_gguf(DEFAULT))
        path.with_suffix(".part").rename(path)
        print(f"made {path} in {time.perf_counter() - start:.0f} s", flush=True)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT)
    ap.add_argument("--only", choices=["self", "overhead"], default=None)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=150)
    ap.add_argument("--draft-layers", type=int, nargs="*", default=[12])
    ap.add_argument("--quantized-draft", default=None, metavar="GGUF", help="the model re-quantized smaller")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/dashchat-spec-draft"))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    results: dict = {"load_before": os.getloadavg(), "tokens": args.tokens, "rounds": args.rounds}
    prompts = {"edit": [edit_prompt(EDITS[0])], "chat": [CHAT[0]]}
    if args.only in (None, "self"):
        path = str(resolve_model(args.model).path)
        drafts = {"self": (args.model, None)}
        drafts.update({f"self {n} layers": (args.model, n) for n in args.draft_layers})
        if args.quantized_draft:
            drafts[Path(args.quantized_draft).stem] = (args.quantized_draft, None)
        results["self"] = run_set(path, drafts, prompts, args, ("forced",))
    if args.only in (None, "overhead"):
        target = str(resolve_model(str(random_3b(args.workdir))).path)
        results["overhead"] = run_set(target, {"0.5B draft": (DEFAULT, None)}, {"chat": prompts["chat"]}, args,
                                     ("adaptive", "forced"))
    results["load_after"] = os.getloadavg()
    print(f"load average before / after: {results['load_before'][0]:.1f} / {results['load_after'][0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
