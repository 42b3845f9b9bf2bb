"""GGUF block kernels (dashchat/engine/cpu/gguf_kernels.c) against gguf-py's reference dequantization.

Weights are random blocks of every supported type (random bytes, with finite random fp16 scales;
F16/BF16: random floats); the integer products quantize activations to int8 per 32 values, so each
output may differ from the float product x . W_ref^T by at most sum_i |W_ref[n, i]| * dx_i / 2 (dx_i
the activation scale of i's group: rounding moves each activation by at most half a step). BF16
rows meet activations rounded to bf16 where the CPU has AVX-512 BF16 (a relative 2^-9 a value).
The tests check that bound, plus float32 summation slack, per output.

The same checks run once more in a subprocess for each narrower build of the library (AVX2
without VNNI, and no vector extensions at all), so the fallbacks are tested on this machine too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from dashchat.engine.cpu.kernels import kernel_library
from dashchat.engine.quantization.gguf import (
    BLOCK_TYPES,
    FLOAT16_TYPES,
    INTERLEAVED_TYPES,
    ROWS8_LAYOUT,
    GGUFLinear,
    GGUFPart,
    dequantize_blocks,
)

pytestmark = pytest.mark.skipif(kernel_library() is None, reason="no C compiler: kernels unavailable")

# byte offsets of each type's fp16 scale fields inside a block
_FP16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
                "IQ4_NL": (0,), "IQ4_XS": (0,)}  # fmt: skip


def random_blocks(type_name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    _, per_block, block_bytes = BLOCK_TYPES[type_name]
    rng = np.random.default_rng(seed)
    if type_name in FLOAT16_TYPES:
        values = torch.from_numpy(rng.standard_normal((rows, cols), dtype=np.float32) * 0.05)
        return values.to(torch.float16 if type_name == "F16" else torch.bfloat16).view(torch.uint8).numpy()
    data = rng.integers(0, 256, size=(rows, cols // per_block, block_bytes), dtype=np.uint8)
    for off in _FP16_FIELDS[type_name]:
        scale = (rng.standard_normal((rows, cols // per_block)) * 0.02).astype(np.float16)
        data[:, :, off : off + 2] = scale.view(np.uint8).reshape(rows, cols // per_block, 2)
    return data.reshape(rows, -1)


def reference(type_name: str, data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(gguf_dequantize(data, GGMLQuantizationType[type_name]), dtype=np.float32))


def activation_span(type_name: str, cols: int) -> int:
    """Values an activation scale spans: a super-block for 256-value block types (as llama.cpp's Q8_K),
    else 32."""
    return 256 if BLOCK_TYPES[type_name][1] == 256 and cols % 256 == 0 else 32


def activation_bound(x: torch.Tensor, w: torch.Tensor, span: int = 32) -> torch.Tensor:
    """Largest |error| int8 activations (one scale per `span` values) can cause, per output."""
    dx = x.abs().reshape(x.shape[0], -1, span).amax(dim=2) / 127.0
    half_step = dx.repeat_interleave(span, dim=1) / 2
    return half_step @ w.abs().T


def error_bound(type_name: str, x: torch.Tensor, w: torch.Tensor, span: int = 32) -> torch.Tensor:
    """What the kernel's rounding of the activations (one scale per `span` values) may cost per
    output, plus float32 sums' slack."""
    products = x.abs() @ w.abs().T
    if type_name in FLOAT16_TYPES:
        return 2.0**-8 * products + 1e-5
    return activation_bound(x, w, span) + 1e-4 * products + 1e-5


def check_type(type_name: str, rows: int, cols: int, batch: int, seed: int) -> None:
    data = random_blocks(type_name, rows, cols, seed)
    w_ref = reference(type_name, data)
    blocks = torch.from_numpy(data)
    torch.testing.assert_close(dequantize_blocks(type_name, blocks, cols), w_ref, rtol=1e-6, atol=1e-7)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(seed))
    bias = torch.randn(rows, generator=torch.Generator().manual_seed(seed + 1))
    layer = GGUFLinear(cols, rows, [GGUFPart(type_name, blocks, cols)], bias)
    y = layer(x)
    expected = x.double() @ w_ref.double().T + bias.double()
    bound = error_bound(type_name, x.double(), w_ref.double(), activation_span(type_name, cols))
    err = (y.double() - expected).abs()
    assert (err <= bound).all(), f"{type_name} rows={rows} batch={batch}: max excess {(err - bound).max():.3g}"
    # and the error is much smaller than the bound on average (rounding errors cancel)
    assert err.mean() < 0.5 * bound.mean()


TYPES = sorted(BLOCK_TYPES)


NEW_TYPES = ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "F16", "BF16"]


@pytest.mark.parametrize("type_name", TYPES)
@pytest.mark.parametrize("batch", [1, 3, 16, 17, 70])
def test_product_matches_reference(type_name: str, batch: int) -> None:
    # odd row counts; 512 inputs = 2 super-blocks; batches of per-row tiles (3 = 2 + 1) and of 8-row
    # ones with a rest (17 = 2 x 8 + 1, 70 = 64 + 4 + 2: past one 64-row pass)
    check_type(type_name, rows=37, cols=512, batch=batch, seed=batch)


@pytest.mark.parametrize("type_name", NEW_TYPES)
@pytest.mark.parametrize("batch", [2, 4, 8, 13])
def test_every_tile_height(type_name: str, batch: int) -> None:
    """The tile kinds one at a time: 2 and 4 rows (per-row tiles), 8 (one 8-row block) and 13 (one
    block padded with zero rows; 16-bit types: 4 + 4 + 4 + 1)."""
    check_type(type_name, rows=13, cols=256, batch=batch, seed=100 + batch)


def batch_invariance(type_name: str, seed: int, counts=range(1, 21)) -> None:
    """A row alone, or at any place in a batch of any size, gets the same outputs bit for bit."""
    rng = np.random.default_rng(seed)
    per_block = BLOCK_TYPES[type_name][1]
    # random widths: 32-value types an odd number of groups (a last, partial group of 8); K-quants 1-3 super-blocks
    cols = per_block * int(rng.integers(1, 4)) if per_block == 256 else 32 * int(rng.choice([5, 9, 13, 27]))
    rows = int(rng.integers(3, 14))
    layer = GGUFLinear(cols, rows, [GGUFPart(type_name, torch.from_numpy(random_blocks(type_name, rows, cols, seed)), cols)])
    x = torch.randn(45, cols, generator=torch.Generator().manual_seed(seed))
    alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    for m in counts:
        start = int(rng.integers(0, x.shape[0] - m + 1))
        assert torch.equal(layer(x[start : start + m]), alone[start : start + m]), f"{type_name} cols={cols} m={m}"
    assert torch.equal(layer(x), alone), f"{type_name}: all {x.shape[0]} rows"


@pytest.mark.parametrize("type_name", TYPES)
def test_a_rows_result_does_not_depend_on_its_batch(type_name: str) -> None:
    """Every row count 1-20 (per-row tiles of 1, 2 and 4 rows, blocks of 8 padded or not) and 45 rows
    give each row the bits it gets alone: every path forms the same exact integers and then the same
    float operations in the same order. A prefix-cache hit turns a long prefill into a short one and
    speculative decoding verifies k + 1 rows at once: neither may change a greedy answer."""
    batch_invariance(type_name, seed=sorted(BLOCK_TYPES).index(type_name))


def test_fused_parts_of_different_types() -> None:
    """A q/k/v layer whose parts have their own types writes each part's slice of one output (16-bit
    parts between integer-product ones: each run of them in its own call)."""
    cols, sizes, types = 256, (32, 8, 8, 16), ("Q5_0", "BF16", "Q8_0", "F16")
    datas = [random_blocks(t, n, cols, i) for i, (t, n) in enumerate(zip(types, sizes))]
    layer = GGUFLinear(cols, sum(sizes), [GGUFPart(t, torch.from_numpy(d), cols) for t, d in zip(types, datas)])
    w_ref = torch.cat([reference(t, d) for t, d in zip(types, datas)])
    x = torch.randn(5, cols, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    bound = error_bound("BF16", x, w_ref) + error_bound("Q8_0", x, w_ref)
    assert ((y - x @ w_ref.T).abs() <= bound).all()
    torch.testing.assert_close(layer.dequantize(), w_ref, rtol=1e-6, atol=1e-7)


def test_one_row_across_parts() -> None:
    """One activation row (a decode step) against a fused layer whose parts have odd row counts and a
    part of one row between: every output keeps the bits it gets in a batch and in a layer of its part
    alone (K-quants only: one activation scale a super-block for all; with a Q8_0 part, 32-value
    scales: the batch check alone)."""
    cols = 512
    for types, sizes in ((("Q4_K", "Q6_K", "Q4_K", "Q5_K", "Q6_K"), (5, 1, 3, 4, 2)), (("Q4_K", "Q8_0", "Q6_K"), (3, 3, 2))):
        datas = [torch.from_numpy(random_blocks(t, n, cols, 20 + i)) for i, (t, n) in enumerate(zip(types, sizes))]
        biases = [torch.randn(n, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(sizes)]
        layer = GGUFLinear(cols, sum(sizes), [GGUFPart(t, d, cols) for t, d in zip(types, datas)], torch.cat(biases))
        x = torch.randn(7, cols, generator=torch.Generator().manual_seed(5))
        alone = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
        assert torch.equal(layer(x), alone) and torch.equal(layer(x[2:5]), alone[2:5]), types
        if "Q8_0" in types:
            continue
        start = 0
        for t, d, b, n in zip(types, datas, biases, sizes):
            part = GGUFLinear(cols, n, [GGUFPart(t, d, cols)], b)
            assert torch.equal(part(x[:1]), alone[:1, start : start + n]), t
            start += n


@pytest.mark.parametrize("type_name", ["Q4_K", "Q6_K", "Q5_0", "Q3_K", "Q2_K", "IQ4_XS", "BF16"])
@pytest.mark.parametrize("k0, k", [(160, 352), (256, 512)])
def test_input_window_of_whole_rows(type_name: str, k0: int, k: int) -> None:
    """A tensor-parallel rank's slice of a row-split weight: whole rows, inputs [k0, k0 + k) on
    32-value groups, cutting through 256-value super-blocks (or on their boundaries: K-quant
    activations then take one scale a super-block and the super-block kernels)."""
    cols = 768
    data = random_blocks(type_name, 21, cols, 3)
    w_ref = reference(type_name, data)[:, k0 : k0 + k]
    layer = GGUFLinear(k, 21, [GGUFPart(type_name, torch.from_numpy(data), k, k_full=cols, k0=k0)])
    torch.testing.assert_close(layer.dequantize(), w_ref, rtol=1e-6, atol=1e-7)
    span = activation_span(type_name, k) if k0 % 256 == 0 else 32
    for batch in (1, 6, 40):
        x = torch.randn(batch, k, generator=torch.Generator().manual_seed(batch))
        bound = error_bound(type_name, x, w_ref, span)
        assert ((layer(x) - x @ w_ref.T).abs() <= bound).all()


def interleaved_part(type_name: str, data: torch.Tensor, cols: int, **window) -> GGUFPart:
    """A part of a copy of `data` with its rows interleaved in groups of 8 (ROWS8_LAYOUT)."""
    part = GGUFPart(type_name, data.clone(), cols, interleave=True, **window)
    assert part.interleaved and part.type_id & ROWS8_LAYOUT
    return part


def layout_invariance(type_name: str, seed: int, counts=(1, 2, 3, 4, 5, 8, 9, 17, 70), cols: int = 768,
                      windows=((0, 768), (256, 512), (32, 256))) -> None:
    """Rows interleaved in groups of 8 give every output the bits of the file's row-major layout, at
    every batch size (1-64 rows: the groups' own tiles, 1, 2 or 4 rows at a time; 65 and up: a group
    unpacked for the 8-row blocks), for whole rows and for a rank's input window (on super-block boundaries and
    not), in a fused layer with a part in the file's layout; 21 rows: two whole groups and 5 more."""
    rows, other_type = 21, "Q5_K" if cols % 256 == 0 else "Q8_0"
    data = torch.from_numpy(random_blocks(type_name, rows, cols, seed))
    other = torch.from_numpy(random_blocks(other_type, 6, cols, seed + 1))
    bias = torch.randn(rows + 6, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(70, cols, generator=torch.Generator().manual_seed(seed))
    for k0, k in windows:
        window = {"k_full": cols, "k0": k0}
        file = GGUFLinear(k, rows + 6, [GGUFPart(type_name, data, k, **window), GGUFPart(other_type, other, k, **window)],
                          bias)
        inter = GGUFLinear(k, rows + 6, [interleaved_part(type_name, data, k, **window),
                                         GGUFPart(other_type, other, k, **window)], bias)
        assert torch.equal(inter.dequantize(), file.dequantize()), (type_name, k0)
        for m in counts:
            xs = x[:m, k0 : k0 + k].contiguous()
            assert torch.equal(inter(xs), file(xs)), f"{type_name} k0={k0} m={m}"


@pytest.mark.parametrize("type_name", sorted(INTERLEAVED_TYPES))
def test_interleaved_rows_give_the_same_bits(type_name: str) -> None:
    layout_invariance(type_name, seed=7)


def prefill_tiles_invariance(seed: int, counts=(9, 64, 65, 77)) -> None:
    """A prompt-sized batch against a layer whose parts are all interleaved whole groups (no blocks of 8
    are built: every group meets the activations through its own tiles, 8 rows at a time where the
    build has the prefill tile, then 4, 2, 1) gives the bits of the file's layout; so does a row of it
    alone. Q4_K and Q6_K fused as a q/k/v layer is (Q6_K still unpacked for the blocks from 65 rows)."""
    cols = 512
    gen = torch.Generator().manual_seed(seed)
    for types in (("Q4_K", "Q4_K"), ("Q4_K", "Q6_K")):
        data = [torch.from_numpy(random_blocks(t, rows, cols, seed + i)) for i, (t, rows) in enumerate(zip(types, (16, 8)))]
        bias = torch.randn(24, generator=gen)
        file = GGUFLinear(cols, 24, [GGUFPart(t, d, cols) for t, d in zip(types, data)], bias)
        inter = GGUFLinear(cols, 24, [interleaved_part(t, d, cols) for t, d in zip(types, data)], bias)
        x = torch.randn(max(counts), cols, generator=gen)
        for m in counts:
            y = inter(x[:m])
            assert torch.equal(y, file(x[:m])), (types, m)
            assert torch.equal(y[m - 1 :], inter(x[m - 1 : m])), (types, m)


def test_prefill_tiles_give_the_same_bits() -> None:
    prefill_tiles_invariance(seed=11)


# The 32-value types' tiles take any window of whole groups: rows of 45 groups (no multiple of 8 or
# 256), windows starting on odd groups, a last unit of fewer than 8 groups.
BLOCKS32_COLS, BLOCKS32_WINDOWS = 1440, ((0, 1440), (96, 1120), (32, 352))


@pytest.mark.parametrize("type_name", sorted(t for t in INTERLEAVED_TYPES if BLOCK_TYPES[t][1] == 32))
def test_interleaved_32_value_blocks_at_any_width(type_name: str) -> None:
    layout_invariance(type_name, seed=11, counts=(1, 3, 4, 7, 66), cols=BLOCKS32_COLS, windows=BLOCKS32_WINDOWS)


def test_engine_interleaves_in_place() -> None:
    """GGUFPart(interleave=True) rearranges the types the decode kernels prefer so in place (no second
    copy) and marks them; other types keep the file's layout."""
    for type_name in ("Q4_K", "Q6_K", "Q8_0", "BF16"):
        data = torch.from_numpy(random_blocks(type_name, 19, 512, 4))
        plain = GGUFLinear(512, 19, [GGUFPart(type_name, data.clone(), 512)])
        copy = data.clone()
        part = GGUFPart(type_name, copy, 512, interleave=True)
        assert part.interleaved == (type_name in INTERLEAVED_TYPES)
        assert part.data.data_ptr() == copy.data_ptr()
        assert torch.equal(copy, data) != part.interleaved
        x = torch.randn(3, 512, generator=torch.Generator().manual_seed(1))
        assert torch.equal(GGUFLinear(512, 19, [part])(x[:1]), plain(x[:1])), type_name


def check_activation_quantization() -> None:
    """dc_gguf_quantize_x against its definition in numpy, bit for bit: per span of 32 or 256 values
    d = amax / 127, q = rint(x / d) (x times 1/d in float32, ties to even), and each 16 values' sum."""
    lib = kernel_library()
    rng = np.random.default_rng(0)
    m, k = 3, 512
    x = (rng.standard_normal((m, k)) * rng.uniform(0.1, 10, (m, 1))).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero group (one of 256: the span's scale still non-zero)
    x[2, :] = np.round(x[2, :] * 4) / 4  # values on quarter steps: exact ties (x.5) after scaling more often
    for span in (32, 256):
        xq = np.zeros(m * k, np.int8)
        xd = np.zeros(m * k // 32, np.float32)
        xs = np.zeros(m * k // 16, np.float32)  # room for the int16 half sums
        lib.dc_gguf_quantize_x(x.ctypes.data, m, k, xq.ctypes.data, xd.ctypes.data, xs.ctypes.data, span)
        spans = x.reshape(-1, span)
        d = np.abs(spans).max(axis=1) / np.float32(127)
        inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), np.float32(0)).astype(np.float32)
        q = np.rint(spans * inv[:, None]).astype(np.int32)
        assert np.array_equal(xd[: len(d)], d), span
        assert np.array_equal(xq.reshape(-1, span), q.astype(np.int8)), span
        sums = xs.view(np.int16)[: m * k // 16]
        assert np.array_equal(sums, q.reshape(-1, 16).sum(axis=1).astype(np.int16)), span


def test_activation_quantization() -> None:
    check_activation_quantization()


def test_padding_rows_score_zero() -> None:
    """A vocabulary-parallel head's last rank has fewer rows than outputs: the rest are zeros."""
    data = random_blocks("Q8_0", 10, 64, 0)
    layer = GGUFLinear(64, 16, [GGUFPart("Q8_0", torch.from_numpy(data), 64)])
    for batch in (2, 80):
        y = layer(torch.randn(batch, 64))
        assert y.shape == (batch, 16) and (y[:, 10:] == 0).all() and (y[:, :10] != 0).any()


def test_rejects_misfit_shapes() -> None:
    with pytest.raises(ValueError):
        GGUFPart("Q4_K", torch.zeros(4, 144, dtype=torch.uint8), 128)  # 128 is not a whole super-block


_SUBPROCESS = """
import sys
sys.path.insert(0, {tests!r})
from engine.test_gguf_kernels import check_type, TYPES
from dashchat.engine.cpu.kernels import kernel_library
assert kernel_library() is not None
from engine.test_gguf_kernels import batch_invariance, check_activation_quantization, layout_invariance
from engine.test_gguf_kernels import prefill_tiles_invariance
from engine.test_gguf_kernels import BLOCKS32_COLS, BLOCKS32_WINDOWS
from dashchat.engine.quantization.gguf import BLOCK_TYPES, INTERLEAVED_TYPES
check_activation_quantization()
for t in TYPES:
    for batch in (1, 5, 20):
        check_type(t, rows=19, cols=256, batch=batch, seed=batch)
    batch_invariance(t, seed=1, counts=(1, 2, 3, 5, 8, 9, 17))
    if t in INTERLEAVED_TYPES:
        layout_invariance(t, seed=2, counts=(1, 2, 3, 9, 70))
    if t in INTERLEAVED_TYPES and BLOCK_TYPES[t][1] == 32:
        layout_invariance(t, seed=3, counts=(1, 4, 7), cols=BLOCKS32_COLS, windows=BLOCKS32_WINDOWS)
prefill_tiles_invariance(seed=3, counts=(9, 65))
print("ok", len(TYPES))
"""


@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64"])  # AVX2 without VNNI; plain SSE2 (portable C)
def test_narrower_builds(march: str) -> None:
    if os.uname().machine != "x86_64":
        pytest.skip("x86-64 builds only")
    env = {**os.environ, "DASHCHAT_CPU_MARCH": march}
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _SUBPROCESS.format(tests=tests)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"ok {len(TYPES)}"
