"""dashchat's C kernels for the CPU (cpu_gemv.c), compiled with the system's C compiler at first use.

The shared library is cached under dashchat's cache folder, keyed by the source, the compiler and
this CPU's feature flags (it is built with -march=native). It links against the OpenMP runtime that
torch has loaded, so its parallel loops run on torch's thread team: a second OpenMP runtime would
start a second team that fights torch's spinning threads for the cores. Where no compiler is found,
or the build fails, `gemv_library()` returns None and callers keep oneDNN; DASHCHAT_CPU_KERNELS=0
turns the kernels off.
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

import torch  # noqa: F401 - loads torch's OpenMP runtime before the kernel library links to it

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_gemv.c")
_CFLAGS = ["-O3", "-march=native", "-fPIC", "-fopenmp", "-std=c11", "-Wall"]
_OPENMP_RUNTIMES = ("libgomp", "libiomp5", "libomp")


def _loaded_openmp() -> str | None:
    """Path of the OpenMP runtime mapped into this process (torch's)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            paths = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(_OPENMP_RUNTIMES):
            return path
    return None


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _build(cc: str, openmp: str, out: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        obj, lib = Path(tmp) / "gemv.o", Path(tmp) / out.name
        # Compile with OpenMP but link without -fopenmp: the library's only OpenMP dependency is then
        # torch's runtime (named by path), not the system's libgomp beside it.
        for cmd in ([cc, *_CFLAGS, "-c", str(_SOURCE), "-o", str(obj)],
                    [cc, "-shared", str(obj), openmp, f"-Wl,-rpath,{Path(openmp).parent}", "-o", str(lib)]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
        os.replace(lib, out)  # atomic: a concurrent start sees no half-written library


@functools.cache
def gemv_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (logged once) where it cannot be had."""
    if os.environ.get("DASHCHAT_CPU_KERNELS", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    openmp = _loaded_openmp()
    if cc is None or openmp is None:
        log.warning("CPU kernels unavailable (%s); float32 linears use oneDNN alone",
                    "no C compiler found" if cc is None else "torch's OpenMP runtime not found")
        return None
    from ..models.gguf_convert import cache_dir

    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256(
            b"\0".join(s.encode() for s in (_SOURCE.read_text(), version, _cpu_flags(), " ".join(_CFLAGS), openmp))
        ).hexdigest()[:16]
        out = cache_dir() / "kernels" / f"cpu_gemv-{key}.so"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            _build(cc, openmp, out)
            log.info("built CPU kernels: %s", out)
        lib = ctypes.CDLL(str(out))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        log.warning("CPU kernels unavailable, float32 linears use oneDNN alone: %s", exc)
        return None
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.dc_linear_ab64a.argtypes = [p, p, p, p, i, i, i]
    lib.dc_linear_ab64a.restype = None
    lib.dc_gemv_max_rows.restype = i
    return lib
