"""Speed of the GGUF kernels per weight type, all types in the same run.

One product of a weight of Qwen2.5-1.5B's gate_proj shape (8960 x 1536 by default) with 1 activation
row (a decode step) and with 64 rows (a prefill chunk), every type in turn within each round, rounds
alternating, medians reported: the weight's bytes, microseconds a product, GB/s of weight bytes a
one-row product streams, and each type's time relative to Q4_K's. The blocks are random bytes
(fp16 fields kept small and finite; 16-bit types random normal values): a product's time does not
depend on the values. `--clock cpu` times with the process's CPU time instead of the wall clock:
with one thread, on a machine others keep busy, it leaves out the time spent waiting for a core.

    python bench/gguf_types.py [--rows 8960] [--cols 1536] [--rounds 15] [--threads 2] [--clock cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from dashchat.engine.quantization.gguf import BLOCK_TYPES, FLOAT16_TYPES, GGUFLinear, GGUFPart


def random_weight(type_name: str, rows: int, cols: int, rng: np.random.Generator) -> torch.Tensor:
    _, per_block, block_bytes = BLOCK_TYPES[type_name]
    if type_name in FLOAT16_TYPES:
        values = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        return values.to(torch.float16 if type_name == "F16" else torch.bfloat16).view(torch.uint8)
    # every byte below 0x3C: any fp16 field read from it is finite and below 1
    data = rng.integers(0, 0x3C, size=(rows, cols // per_block * block_bytes), dtype=np.uint8)
    return torch.from_numpy(data)


def timed(layer: GGUFLinear, x: torch.Tensor, repeat: int, clock=time.perf_counter) -> float:
    layer(x)  # warm: scratch buffers, caches
    start = clock()
    for _ in range(repeat):
        layer(x)
    return (clock() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=8960)
    ap.add_argument("--cols", type=int, default=1536)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args()
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    layers = {t: GGUFLinear(args.cols, args.rows, [GGUFPart(t, random_weight(t, args.rows, args.cols, rng), args.cols)])
              for t in sorted(BLOCK_TYPES, key=lambda t: BLOCK_TYPES[t][2] / BLOCK_TYPES[t][1])}
    xs = {m: torch.randn(m, args.cols) for m in (1, 64)}
    times: dict[tuple[str, int], list[float]] = {(t, m): [] for t in layers for m in xs}
    for r in range(args.rounds):
        order = list(layers) if r % 2 == 0 else list(reversed(layers))  # alternate who goes first
        for t in order:
            for m, x in xs.items():
                times[t, m].append(timed(layers[t], x, 20 if m == 1 else 3, clock))
    med = {key: statistics.median(v) for key, v in times.items()}
    print(f"weight {args.rows} x {args.cols}, {args.threads} threads, {args.rounds} rounds (medians), {args.clock} clock")
    print(f"{'type':8} {'MB':>7} {'1 row us':>9} {'GB/s':>6} {'vs Q4_K':>8} {'64 rows us':>11} {'vs Q4_K':>8}")
    for t, layer in layers.items():
        mb = layer.nbytes / 1e6
        one, many = med[t, 1], med[t, 64]
        print(f"{t:8} {mb:7.2f} {one * 1e6:9.0f} {layer.nbytes / one / 1e9:6.1f} {one / med['Q4_K', 1]:8.2f} "
              f"{many * 1e6:11.0f} {many / med['Q4_K', 64]:8.2f}")


if __name__ == "__main__":
    main()
