"""How many threads a CPU engine should run."""

from __future__ import annotations

import os

# How many times an idle OpenMP thread of libgomp (torch's runtime) polls before it sleeps. libgomp's
# own default, 300000 polls with a pause instruction each, is ~12-16 ms on this project's AMD CPU:
# longer than the kernel lets a thread run before it runs another. A decode step is hundreds of
# parallel loops, each ending in a barrier; when another process takes a core, a team thread waiting
# at a barrier for its descheduled partner spins away the time that partner needs, and one-stream
# decode of the 0.5B default model fell from ~31 to 1.3 tok/s beside one busy process. Polling
# ~150 us, the waiting thread soon sleeps and its core goes to the thread it waits for (~14 tok/s
# there). Not sleeping at once (0): that was ~17% slower on a quiet machine, a futex wake-up for most
# loops. bench/contention.py measures it.
OPENMP_SPIN_COUNT = "3000"


def default_openmp_spin(environ: dict[str, str] | os._Environ = os.environ) -> None:
    """Set GOMP_SPINCOUNT to OPENMP_SPIN_COUNT unless the user chose a spin or wait policy. libgomp
    reads it once, when it loads (with torch): this must run before the first `import torch`."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = OPENMP_SPIN_COUNT


def physical_cores() -> int:
    """Physical cores available to this process (hyper-threads slow matmuls down)."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        with open("/proc/cpuinfo", encoding="ascii") as f:
            info = f.read()
        siblings = [int(l.split(":")[1]) for l in info.splitlines() if l.startswith("siblings")]
        cores = [int(l.split(":")[1]) for l in info.splitlines() if l.startswith("cpu cores")]
        if siblings and cores and siblings[0] > cores[0]:
            return max(1, logical * cores[0] // siblings[0])
    except (OSError, ValueError, IndexError):
        pass
    return max(1, logical)
