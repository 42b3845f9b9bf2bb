"""Engine tests run the real engine on the embedded SmolLM2-135M (float32, CPU)."""

from __future__ import annotations

import pytest

from dashchat.models.resolve import resolve_model


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return str(resolve_model("smollm2-135m-instruct").path)
