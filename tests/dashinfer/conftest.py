"""DashInfer engine tests: SmolLM2-135M (float32, CPU) through DashInfer, the native engine and transformers.

The converted model lands in the dashchat cache once; later sessions load it from there.
"""

from __future__ import annotations

import os

import pytest
from dashinfer_helpers import MAX_MODEL_LEN

from dashchat.engine.args import EngineArgs
from dashchat.models.resolve import resolve_model

os.environ.setdefault("GLOG_minloglevel", "2")  # before DashInfer loads: its INFO log is per request


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    return str(resolve_model("smollm2-135m-instruct").path)


@pytest.fixture(scope="session")
def engine(smollm2_dir: str):
    from dashchat.engine.dashinfer.engine import DashInferEngine

    eng = DashInferEngine.from_args(EngineArgs(model_dir=smollm2_dir, max_model_len=MAX_MODEL_LEN, max_num_seqs=4))
    yield eng
    eng.shutdown()
