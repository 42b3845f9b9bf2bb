"""Session-scoped real servers (SmolLM2-135M on CPU), started once and shared by the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from server_proc import SMOLLM_ARGS, ServerProcess, running


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    """The plain server: defaults except a small context and batch, as a user would start it."""
    yield from running(*SMOLLM_ARGS, "--max-model-len", "1024",
                       "--max-num-seqs", "16", "--max-queue", "256")


@pytest.fixture(scope="session")
def model_name(server: ServerProcess) -> str:
    return str(httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["id"])
