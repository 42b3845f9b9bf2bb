"""dashchat's C kernels for the CPU (kernels.c), compiled with the system's C compiler at first use.

The shared library is cached under dashchat's cache folder, keyed by the source, the compiler and
this CPU's feature flags (it is built with -march=native). It links against the OpenMP runtime that
torch has loaded, so its parallel loops run on torch's thread team: a second OpenMP runtime would
start a second team that fights torch's spinning threads for the cores. Where no compiler is found,
or the build fails, `kernel_library()` returns None and callers keep PyTorch's own ops (oneDNN for
the linears); DASHCHAT_CPU_KERNELS=0 turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch  # loads torch's OpenMP runtime before the kernel library links to it

log = logging.getLogger(__name__)

_SOURCES = tuple(Path(__file__).with_name(name) for name in ("kernels.c", "gguf_kernels.c", "decode_step.c", "moe_kernels.c"))
# DASHCHAT_CPU_MARCH builds for an older CPU than this one (tests run the AVX2 and portable paths
# with it on an AVX-512 machine); the default is this CPU's own instruction set.
# -ffp-contract=off: no a * b + c is fused behind the code's back (the GGUF kernels' float steps are
# written out, the same in every path, so a row's result does not depend on its batch).
_CFLAGS = ["-O3", f"-march={os.environ.get('DASHCHAT_CPU_MARCH', 'native')}", "-fPIC", "-fopenmp", "-std=c11",
           "-ffp-contract=off", "-Wall"]


class _DlInfo(ctypes.Structure):
    _fields_ = [("dli_fname", ctypes.c_char_p), ("dli_fbase", ctypes.c_void_p),
                ("dli_sname", ctypes.c_char_p), ("dli_saddr", ctypes.c_void_p)]


def torch_openmp() -> str | None:
    """Path of the OpenMP runtime torch's own kernels call (other packages may have loaded theirs,
    DashInfer does): the library that answers libtorch_cpu's lookup of omp_get_max_threads."""
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        address = ctypes.cast(torch_cpu.omp_get_max_threads, ctypes.c_void_p)
        info = _DlInfo()
        if ctypes.CDLL(None).dladdr(address, ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError):
        pass
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(cc: str, openmp: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        objs, lib = [str(Path(tmp) / f"{src.stem}.o") for src in _SOURCES], Path(tmp) / out.name
        # Compile with OpenMP but link without -fopenmp: the library's only OpenMP dependency is then
        # torch's runtime (named by path), not the system's libgomp beside it.
        compiles = [[cc, *_CFLAGS, "-c", str(src), "-o", obj] for src, obj in zip(_SOURCES, objs)]
        for cmd in (*compiles,
                    [cc, "-shared", *objs, openmp, f"-Wl,-rpath,{Path(openmp).parent}", "-lm", "-o", str(lib)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: a concurrent start sees no half-written library


@functools.cache
def kernel_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged once) where it cannot be had."""
    if os.environ.get("DASHCHAT_CPU_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    openmp = torch_openmp()
    if cc is None or openmp is None:
        log.warning("CPU kernels unavailable (%s); float32 decoding uses PyTorch's ops (slower)",
                    "no C compiler found" if cc is None else "torch's OpenMP runtime not found")
        return None
    from ...paths import cache_dir

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            b"\0".join(s.encode() for s in (*(src.read_text() for src in _SOURCES), version, _cpu_flags(), " ".join(_CFLAGS), openmp))
        ).hexdigest()[:16]
        out = cache_dir() / "kernels" / f"cpu_kernels-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _build(cc, openmp, out)
            log.info("built CPU kernels: %s", out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable, float32 decoding uses PyTorch's ops (slower): %s", exc)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dc_linear_ab64a.argtypes = [p, p, p, p, i, i, i]
    lib.dc_linear_ab64a.restype = None
    lib.dc_paged_decode_attention.argtypes = [p, p, p, p, p, p, i, i, i, i, i, i, ctypes.c_float, i]
    lib.dc_paged_decode_attention.restype = i
    lib.dc_rms_norm.argtypes = [p, p, p, i, i, ctypes.c_float]
    lib.dc_rms_norm.restype = None
    lib.dc_silu_and_mul.argtypes = [p, p, i, i]
    lib.dc_silu_and_mul.restype = None
    lib.dc_rope_neox.argtypes = [p, i, i, i, ctypes.c_int64, p, p]
    lib.dc_rope_neox.restype = None
    lib.dc_gguf_activation_span.argtypes = [i, p, p, i]
    lib.dc_gguf_activation_span.restype = i
    lib.dc_gguf_quantize_x.argtypes = [p, i, i, p, p, p, i]
    lib.dc_gguf_quantize_x.restype = None
    lib.dc_gguf_matmul_parts.argtypes = [i, p, p, p, p, p, p, p, p, p, p, i, i, i, i]
    lib.dc_gguf_matmul_parts.restype = i
    lib.dc_gguf_matmul16_parts.argtypes = [i, p, p, p, p, p, p, p, p, i, i, i]
    lib.dc_gguf_matmul16_parts.restype = i
    lib.dc_gguf_dequantize.argtypes = [i, p, i, i, i, i, p]
    lib.dc_gguf_dequantize.restype = i
    lib.dc_gguf_interleave.argtypes = [i, p, i, i]
    lib.dc_gguf_interleave.restype = i
    lib.dc_gguf_decode_layers.argtypes = [p, p, p, i, p, p, p, p, p, i]
    lib.dc_gguf_decode_layers.restype = i
    lib.dc_gguf_dequantize_rows.argtypes = [i, p, i, p, i, i, p]
    lib.dc_gguf_dequantize_rows.restype = i
    lib.dc_moe_gguf_routed.argtypes = [i, i, i, p, p, p, i, i, p, p, p, p, p, p, p, p]
    lib.dc_moe_gguf_routed.restype = i
    lib.dc_moe_route.argtypes = [p, i, i, i, i, p, p]
    lib.dc_moe_route.restype = i
    lib.dc_sigmoid.argtypes = [p, p, i]
    lib.dc_sigmoid.restype = None
    return lib


def paged_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, window: int = 0,
) -> torch.Tensor:
    """Float32 decode attention over the paged cache: q [N, Hq, D] -> [N, Hq * D]. `window` > 0:
    each query sees only the last `window` keys of its sequence (sliding-window layers)."""
    lib = kernel_library()
    q, tables, lens = q.contiguous(), block_tables.contiguous(), context_lens.contiguous()
    n, hq, d = q.shape
    out = q.new_empty(n, hq * d)
    failed = lib.dc_paged_decode_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
        n, hq, k_cache.shape[1], d, tables.shape[1], block_size, scale, window,
    )
    if failed:
        raise MemoryError("decode attention: no memory for its scores")
    return out


@torch.library.custom_op("dashchat::paged_decode_attention", mutates_args=())
def paged_decode_attention_op(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, window: int = 0,
) -> torch.Tensor:
    """The same for torch.compile graphs (a custom op is an extern kernel to them)."""
    return paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window)


@paged_decode_attention_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, block_size, scale, window=0):
    return q.new_empty(q.shape[0], q.shape[1] * q.shape[2])
