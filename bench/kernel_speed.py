"""GB/s of GGUF blocks the CPU product kernels read, on one matrix of a real model's shape.

    python bench/kernel_speed.py                       # Q4_K and Q6_K, 2048x11008 and 11008x2048
    python bench/kernel_speed.py --baseline HEAD~3     # also the kernels of another git revision
    python bench/kernel_speed.py --types Q4_0 --shape 3584x18944 --rows 1 4 --threads 1 2
    python bench/kernel_speed.py --types Q8_0 Q4_0 Q5_0 --shape 1536x1536 1536x8960 --rows 1 8 --working-set 256 --baseline main
    python bench/kernel_speed.py --baseline main --threads 1 --best --rows 1 2 4 8 32 512   # prefill too

Random blocks (finite fp16 scales), activations x [m, k]; each measurement is the median of
--repeats timed products (quantizing x included, as the engine does), the builds alternating within
each round so both see the same machine load. Prints the blocks' bytes read per second and the
operations (2 m n k) per second, and the machine's read bandwidth (summing a 1 GiB buffer) measured
in the same run. --best takes the fastest product of all rounds instead (a shared, noisy machine:
the least disturbed run is the closest to what the kernel can do); GOP/s per core then means one thread.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dashchat.engine.cpu import kernels  # noqa: E402
from dashchat.engine.quantization.gguf import BLOCK_TYPES, INTERLEAVED_TYPES, ROWS8_LAYOUT  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import gguf_blocks  # noqa: E402

def random_blocks(type_name: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    return gguf_blocks.random_blocks(np.random.default_rng(seed), type_name, rows, cols, scale=0.02)


def build_revision(rev: str, out_dir: Path) -> ctypes.CDLL:
    """The kernel library built from git revision `rev`'s sources (same flags and runtime)."""
    srcs = []
    for src in kernels._SOURCES:
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{src.relative_to(ROOT)}"], check=True,
                              capture_output=True, text=True).stdout
        path = out_dir / src.name
        path.write_text(text)
        srcs.append(path)
    saved = kernels._SOURCES
    kernels._SOURCES = tuple(srcs)
    try:
        lib_path = out_dir / "baseline.so"
        kernels._build(os.environ.get("CC", "cc"), kernels.torch_openmp(), lib_path)
    finally:
        kernels._SOURCES = saved
    lib = ctypes.CDLL(str(lib_path))
    p, i = ctypes.c_void_p, ctypes.c_int
    spans = hasattr(lib, "dc_gguf_activation_span")  # newer kernels take the activations' scale span
    lib.dc_gguf_quantize_x.argtypes = [p, i, i, p, p, p] + [i] * spans
    lib.dc_gguf_matmul_parts.argtypes = [i, p, p, p, p, p, p, p, p, p, p, i, i, i] + [i] * spans
    if spans:
        lib.dc_gguf_activation_span.argtypes = [i, p, p, i]
    if hasattr(lib, "dc_gguf_interleave"):
        lib.dc_gguf_interleave.argtypes = [i, p, i, i]
    return lib


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """GB/s of both (all) cores summing a 1 GiB buffer (far larger than the caches)."""
    torch.set_num_threads(threads)
    buf = torch.ones(1 << 28, dtype=torch.float32)
    buf.sum()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times) / 1e9


class Product:
    """One product x . W^T a call; with several copies of W, each call takes the next (a working set
    larger than the last-level cache makes every call read its blocks from memory, as a decode step
    reading a whole model does)."""

    def __init__(self, lib: ctypes.CDLL, type_name: str, copies: list[torch.Tensor], n: int, k: int, m: int,
                 type_id: int) -> None:
        self.lib, self.n, self.k, self.m = lib, n, k, m
        self.copies, self.turn = copies, 0
        self.x = torch.randn(m, k)
        self.y = torch.empty(m, n)
        self.act = torch.empty(m * k + 12 * (m * k // 32) + 64, dtype=torch.uint8)
        base = self.act.data_ptr()
        self.xq, self.xd = base, base + m * k
        self.xs = self.xd + 4 * (m * k // 32)
        self.weights = [(ctypes.c_void_p * 1)(c.data_ptr()) for c in copies]
        self.args = [1, (ctypes.c_int * 1)(type_id), self.weights[0],
                     None, None, (ctypes.c_int * 1)(n), None]
        self.span = (lib.dc_gguf_activation_span(1, self.args[1], None, k),) if hasattr(
            lib, "dc_gguf_activation_span") else ()

    def __call__(self) -> None:
        self.turn = (self.turn + 1) % len(self.weights)
        self.args[2] = self.weights[self.turn]
        self.lib.dc_gguf_quantize_x(self.x.data_ptr(), self.m, self.k, self.xq, self.xd, self.xs, *self.span)
        if self.lib.dc_gguf_matmul_parts(*self.args, self.xq, self.xd, self.xs, self.y.data_ptr(), self.m, self.k,
                                         self.n, *self.span):
            raise RuntimeError("kernel refused the product")


def layout(lib: ctypes.CDLL, type_name: str, copies: list[torch.Tensor], n: int, k: int
           ) -> tuple[list[torch.Tensor], int]:
    """The copies as a build's engine holds them, and the type id that says how: interleaved in groups of
    8 rows where the build has that layout for the type (its own copies, rearranged), else the file's
    (an older build's dc_gguf_interleave refuses a type it has no layout for: -1)."""
    type_id = BLOCK_TYPES[type_name][0]
    if not hasattr(lib, "dc_gguf_interleave") or type_name not in INTERLEAVED_TYPES:
        return copies, type_id
    own = [c.clone() for c in copies]
    for i, c in enumerate(own):
        status = lib.dc_gguf_interleave(type_id, c.data_ptr(), n, k)
        if status == -1 and i == 0:
            return copies, type_id
        if status:
            raise RuntimeError("interleaving failed")
    return own, type_id | ROWS8_LAYOUT


def timed(fn, repeats: int, clock=time.perf_counter, best: bool = False) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = clock()
        fn()
        times.append(clock() - t)
    return min(times) if best else statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", nargs="+", default=["Q4_K", "Q6_K"])
    ap.add_argument("--shape", nargs="+", default=["2048x11008", "11008x2048"], help="NxK: N outputs of K inputs")
    ap.add_argument("--rows", nargs="+", type=int, default=[1], help="activation rows m (e.g. 1 2 4 8 32 512)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--baseline", help="git revision whose kernels run alongside")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time, not the wall clock (one thread on a loaded machine: "
                         "time spent waiting for a core is not counted)")
    ap.add_argument("--best", action="store_true", help="the fastest product of all rounds, not the median")
    ap.add_argument("--working-set", type=float, default=0.0, metavar="MB",
                    help="cycle through copies of the matrix adding up to at least this many MB (e.g. 256: "
                         "more than the last-level cache, so the blocks come from memory as in a decode step; "
                         "default one copy, which a large L3 may hold)")
    args = ap.parse_args()
    builds = {"this tree": kernels.kernel_library()}
    tmp = tempfile.TemporaryDirectory()
    if args.baseline:
        builds[args.baseline] = build_revision(args.baseline, Path(tmp.name))
    bw = {t: read_bandwidth(t) for t in args.threads}
    print("read bandwidth: " + ", ".join(f"{t} thread(s) {bw[t]:.1f} GB/s" for t in args.threads))
    print(f"| type | NxK | m | threads | {' | '.join(f'{b} GB/s, GOP/s' for b in builds)} |")
    print(f"|---|---|---|---|{'---|' * len(builds)}")
    for type_name in args.types:
        for shape in args.shape:
            n, k = map(int, shape.split("x"))
            data = torch.from_numpy(random_blocks(type_name, n, k))
            copies = [data] + [data.clone() for _ in range(1, max(1, math.ceil(args.working_set * 1e6 / data.numel())))]
            held = {b: layout(lib, type_name, copies, n, k) for b, lib in builds.items()}
            for m in args.rows:
                products = {b: Product(lib, type_name, held[b][0], n, k, m, held[b][1]) for b, lib in builds.items()}
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    seen: dict[str, list[float]] = {b: [] for b in builds}
                    for _ in range(args.rounds):
                        for b, prod in products.items():
                            clock = time.process_time if args.cpu_time else time.perf_counter
                            seen[b].append(data.numel() / timed(prod, args.repeats, clock, args.best) / 1e9)
                    # GB/s of blocks; GOP/s: 2 m n k operations over the same time
                    pick = max if args.best else statistics.median
                    cells = " | ".join(f"{pick(v):.1f}, {pick(v) * 2 * m * n * k / data.numel():.0f}" for v in seen.values())
                    print(f"| {type_name} | {shape} | {m} | {threads} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
