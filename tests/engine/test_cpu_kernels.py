"""The C kernels for float32 decode on CPU (dashchat/engine/cpu/kernels.c) against PyTorch's own ops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dashchat.engine.cpu.kernels import kernel_library, torch_openmp
from dashchat.engine.cpu.linear import SMALL_BATCH_ROWS, PackedLinear


def test_kernel_library_builds_against_torchs_openmp():
    assert kernel_library() is not None, "cc could not build dashchat/engine/cpu/kernels.c (see the warning logged)"
    # Torch's runtime, even where another package loaded its own first (DashInfer's tests do).
    runtime = Path(torch_openmp())
    assert runtime.name.startswith("libgomp") and runtime.resolve().parent == Path(torch.__file__).resolve().parent / "lib"
    # In a fresh process, loading the kernels maps no OpenMP runtime besides the one torch loaded.
    script = (
        "import torch\n"
        "def runtimes():\n"
        "    return {l.split()[-1] for l in open('/proc/self/maps') if 'omp' in l.split()[-1].rsplit('/', 1)[-1]}\n"
        "before = runtimes()\n"
        "from dashchat.engine.cpu.kernels import kernel_library\n"
        "assert kernel_library() is not None\n"
        "assert runtimes() == before, (before, runtimes())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)


@pytest.mark.parametrize(
    ("out_features", "in_features", "bias"),
    [(960, 576, False), (1152, 896, True), (130, 64, True), (64, 1536, False)],
)
def test_small_batch_linear_matches_pytorch(out_features, in_features, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(in_features, out_features, bias=bias)
    packed = PackedLinear(linear)
    if out_features % 64 == 0:
        assert packed._weight_ptr is not None, "oneDNN's layout was not recognised: the kernel is not in use"
    with torch.inference_mode():
        for rows in [0, 1, 2, 3, 5, 6, 7, 8, 13, SMALL_BATCH_ROWS, SMALL_BATCH_ROWS + 1, 40]:
            x = torch.randn(rows, in_features)
            expected = F.linear(x, linear.weight, linear.bias)
            torch.testing.assert_close(packed(x), expected, rtol=1e-4, atol=1e-4)
        # a strided input (a view into a wider tensor) is read correctly too
        wide = torch.randn(4, 2 * in_features)
        x = wide[:, :in_features]
        torch.testing.assert_close(packed(x), F.linear(x, linear.weight, linear.bias), rtol=1e-4, atol=1e-4)


def test_small_batch_linear_inside_torch_compile():
    torch.manual_seed(0)
    linear = torch.nn.Linear(576, 192, bias=True)
    packed = PackedLinear(linear)
    compiled = torch.compile(lambda x: packed(x) * 2, dynamic=True, fullgraph=True)
    with torch.inference_mode():
        for rows in (2, 9, 33):
            x = torch.randn(rows, 576)
            torch.testing.assert_close(compiled(x), 2 * F.linear(x, linear.weight, linear.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("hq", "hkv", "dim"), [(9, 3, 64), (14, 2, 64), (4, 4, 48), (32, 8, 128)])
def test_paged_decode_attention_matches_pytorch(hq, hkv, dim):
    from dashchat.engine.native.attention import PagedAttention, StepAttentionMetadata

    gen = torch.Generator().manual_seed(hq)
    bs, blocks = 16, 128
    cache = [(torch.randn(blocks * bs, hkv, dim, generator=gen), torch.randn(blocks * bs, hkv, dim, generator=gen))]
    lens = torch.tensor([1, 16, 17, 100, 333])  # one key, a full block, a block and one, longer
    width = -(-int(lens.max()) // bs) + 1  # padded wider than any sequence needs
    tables = torch.randperm(blocks, generator=gen)[: len(lens) * width].view(len(lens), width)
    slots = torch.stack([tables[i, (n - 1) // bs] * bs + (n - 1) % bs for i, n in enumerate(lens.tolist())])
    q, k, v = (torch.randn(len(lens), h, dim, generator=gen) * 3 for h in (hq, hkv, hkv))
    outs = []
    for kernel in (True, False):
        attention = PagedAttention([tuple(c.clone() for c in cache[0])], bs, dim**-0.5)
        assert attention.decode_kernel
        attention.decode_kernel = kernel
        attention.begin_step(StepAttentionMetadata(slots, len(lens), tables, lens, []))
        outs.append(attention(0, q, k, v))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_rms_norm_and_silu_and_mul_match_pytorch():
    from dashchat.engine.cpu.ops import KernelRMSNorm, kernel_silu_and_mul
    from dashchat.models.layers import RMSNorm, silu_and_mul

    gen = torch.Generator().manual_seed(1)
    norm = RMSNorm(576, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576, generator=gen))
    kernel_norm = KernelRMSNorm(norm)
    with torch.inference_mode():
        for shape in [(1, 576), (8, 576), (300, 576), (5, 9, 576)]:
            x = torch.randn(*shape, generator=gen) * 4
            torch.testing.assert_close(kernel_norm(x), norm(x), rtol=1e-5, atol=1e-5)
        for rows in (1, 8, 200):
            # gates far into both tails: silu must neither overflow nor lose the sign
            gate_up = torch.randn(rows, 2 * 1536, generator=gen) * 30
            torch.testing.assert_close(kernel_silu_and_mul(gate_up), silu_and_mul(gate_up), rtol=1e-5, atol=1e-5)


def test_rotary_embedding_in_place_matches_pytorch():
    from dashchat.engine.cpu.ops import kernel_rope_qk
    from dashchat.models.layers import RotaryEmbedding, apply_rope_qk

    gen = torch.Generator().manual_seed(2)
    rotary = RotaryEmbedding(64, 4096, 10000.0, None)
    hq, hkv, d = 9, 3, 64
    for rows in (1, 8, 300):
        rope = rotary(torch.randint(0, 4096, (rows,), generator=gen), torch.float32)
        qkv = torch.randn(rows, (hq + 2 * hkv) * d, generator=gen)
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)  # strided views, as the model makes
        q, k, v = q.view(rows, hq, d), k.view(rows, hkv, d), v.view(rows, hkv, d)
        expected_q, expected_k = apply_rope_qk(q.clone(), k.clone(), rope)
        v_before = v.clone()
        got_q, got_k = kernel_rope_qk(q, k, rope)
        torch.testing.assert_close(got_q, expected_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_k, expected_k, rtol=1e-5, atol=1e-5)
        assert torch.equal(v, v_before)  # the values, between k and the row's end, untouched
        # contiguous inputs (Qwen3's q/k norms return these)
        q2, k2 = torch.randn(rows, hq, d, generator=gen), torch.randn(rows, hkv, d, generator=gen)
        expected_q, expected_k = apply_rope_qk(q2.clone(), k2.clone(), rope)
        got_q, got_k = kernel_rope_qk(q2, k2, rope)
        torch.testing.assert_close(got_q, expected_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_k, expected_k, rtol=1e-5, atol=1e-5)
