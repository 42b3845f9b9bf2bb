"""How many threads a CPU engine should run."""

from __future__ import annotations

import os


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
