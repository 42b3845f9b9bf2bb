"""Where a one-stream decode step's time goes, in process: the engine's step thread with timers.

    python bench/decode_step_profile.py MODEL.gguf [--threads 2] [--tokens 128] [--repeats 3]

Runs greedy one-stream generations on the native engine (GGUF blocks, the fused C decode step) and
times, per decode step: the decoder layers' C call, the final norm and output head, the embedding
and rotary rows, the sampler, the rest of runner.run (step inputs), the rest of the engine's step
(scheduler bookkeeping, outputs) and the loop between steps. The ideal is the bytes a token reads
(every linear weight and the head) over the machine's read bandwidth (bench/real_shapes.py).
Absolute numbers move with the machine's load: compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dashchat.engine.args import EngineArgs  # noqa: E402
from dashchat.engine.native.llm_engine import AsyncLLMEngine  # noqa: E402
from dashchat.engine.types import SamplingParams  # noqa: E402
from dashchat.models.resolve import resolve_model  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)


def timed(name: str, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            TIMES[name] += time.perf_counter() - t
            TIMES["_calls " + name] += 1
    return wrapper


class TimedFused:
    def __init__(self, fused) -> None:
        self.fused, self.runs = fused, fused.runs

    def __call__(self, *a):
        t = time.perf_counter()
        out = self.fused(*a)
        TIMES["layers (C step)"] += time.perf_counter() - t
        return out


def instrument(engine: AsyncLLMEngine) -> None:
    runner, model = engine.runner, engine.runner.model
    if runner.fused_decode is None:
        raise SystemExit("no fused decode step for this model: nothing to profile here")
    runner.fused_decode = TimedFused(runner.fused_decode)
    model.compute_logits = timed("head", model.compute_logits)
    for name, module in (("final norm", model.norm), ("embedding", model.embed_tokens), ("rotary", model.rotary)):
        def pre(_m, _a, name=name):
            TIMES["_start " + name] = time.perf_counter()

        def post(_m, _a, _o, name=name):
            TIMES[name] += time.perf_counter() - TIMES["_start " + name]
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)
    runner.run = timed("runner.run", runner.run)
    engine.sampler.sample = timed("sampler", engine.sampler.sample)
    engine._step = timed("engine step", engine._step)
    engine.scheduler.schedule = timed("schedule", engine.scheduler.schedule)
    engine._publish = timed("publish", engine._publish)
    engine._sample_all = timed("sample_all", engine._sample_all)
    engine.blocks.register_full_blocks = timed("register_full_blocks", engine.blocks.register_full_blocks)


async def one(engine, ids: list[int], tokens: int, rid: str) -> tuple[float, int]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    first, count = None, 0
    async for out in engine.generate(ids, params, rid):
        count += sum(len(d.token_ids) for d in out.deltas)
        if first is None and count:
            first = time.perf_counter()
            TIMES.clear()
    return time.perf_counter() - first, count - 1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s (default: measured)")
    args = ap.parse_args()
    import real_shapes

    model_dir = str(resolve_model(args.model).path)
    engine = AsyncLLMEngine(EngineArgs(model_dir=model_dir, quantization="gguf", num_threads=args.threads,
                                       max_model_len=1024, max_num_seqs=4))
    instrument(engine)
    ids = engine.tokenizer.encode("Write a story about a lighthouse keeper. Once upon a time")
    asyncio.run(one(engine, ids, 8, "warm"))
    runs = []
    for r in range(args.repeats):
        wall, steps = asyncio.run(one(engine, ids, args.tokens, f"r{r}"))
        time.sleep(0.2)  # the last step's bookkeeping ends after its token is out
        runs.append((wall, steps, dict(TIMES)))
    wall, steps, times = sorted(runs, key=lambda r: r[0] / r[1])[len(runs) // 2]
    bw = args.bandwidth or real_shapes.read_bandwidth()
    weights = real_shapes.weight_bytes(Path(args.model))
    # components per engine step (the window can cut a step), the loop's share from the wall per token
    ms = lambda s: 1000 * s / times["_calls engine step"]  # noqa: E731
    step_ms = 1000 * wall / steps
    ideal = weights / bw / 1e6
    print(f"{steps / wall:.2f} tok/s, {step_ms:.2f} ms a token; ideal {ideal:.2f} ms ({weights / 1e9:.3f} GB at "
          f"{bw:.1f} GB/s): {100 * ideal / step_ms:.0f}% of read bandwidth")
    inner = {k: v for k, v in times.items() if not k.startswith("_")}
    run_rest = inner["runner.run"] - sum(inner.get(k, 0) for k in ("layers (C step)", "head", "final norm",
                                                                     "embedding", "rotary"))
    step_rest = inner["engine step"] - inner["runner.run"] - inner.get("sample_all", 0)
    rows = [(k, inner.get(k, 0)) for k in ("layers (C step)", "head", "final norm", "embedding", "rotary")]
    rows += [("runner.run rest (inputs)", run_rest), ("sample_all", inner.get("sample_all", 0)),
             ("  of which sampler", inner.get("sampler", 0)), ("engine step rest (outputs)", step_rest),
             ("  of which publish", inner.get("publish", 0)),
             ("  of which register_full_blocks", inner.get("register_full_blocks", 0)),
             ("schedule", inner.get("schedule", 0))]
    for k, v in rows:
        print(f"  {k:34s} {ms(v):7.3f} ms  {100 * ms(v) / step_ms:5.1f}%")
    rest = step_ms - ms(inner["engine step"] + inner.get("schedule", 0))
    print(f"  {'loop, async front (rest of wall)':34s} {rest:7.3f} ms  {100 * rest / step_ms:5.1f}%")


if __name__ == "__main__":
    main()
