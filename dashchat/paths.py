"""Where dashchat keeps what it computes once: converted models, packed weights, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of dashchat's cache: $DASHCHAT_CACHE or ~/.cache/dashchat."""
    return Path(os.environ.get("DASHCHAT_CACHE") or Path.home() / ".cache" / "dashchat").expanduser()
