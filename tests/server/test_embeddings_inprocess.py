"""The server's part of embeddings (in-process, a pooling engine that returns known vectors):
Matryoshka truncation then normalisation, base64 bytes, Ollama's shape, and which folder serves
which task (models/pooling.py)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from server_fakes import PoolingEngine
from starlette.testclient import TestClient
from tiny_embeddings import write_st_files

from dashchat.models.pooling import EmbeddingSpec, read_embedding_spec, read_rerank_spec, resolve_task
from dashchat.server.app import build_app, server_state
from dashchat.server.config import ServerConfig


class _Recording(PoolingEngine):
    """Remembers the raw vector it returned for each prompt."""

    raw: dict[tuple[int, ...], torch.Tensor] = {}

    async def pool(self, prompt_token_ids, params, request_id):  # type: ignore[no-untyped-def]
        out = await super().pool(prompt_token_ids, params, request_id)
        self.raw[tuple(prompt_token_ids)] = out.hidden
        return out


@pytest.fixture()
def client() -> Iterator[TestClient]:
    app = build_app(_Recording(), ServerConfig(["m"], task="embed"))
    server_state(app).model.pooling = EmbeddingSpec("last", normalize=True, matryoshka=(4, 8))
    with TestClient(app) as c:
        yield c


def test_dimensions_cut_then_normalise(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={"input": ["abc", "de"], "dimensions": 4, "encoding_format": "base64"})
    assert r.status_code == 200, r.text
    for item, text in zip(r.json()["data"], ["abc", "de"]):
        got = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        raw = _Recording.raw[tuple(text.encode())]
        want = torch.nn.functional.normalize(raw[:4], dim=0).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert r.json()["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    r = client.post("/v1/embeddings", json={"input": "abc", "dimensions": 5})
    assert r.status_code == 400 and "4, 8" in r.json()["error"]["message"]
    r = client.post("/api/embed", json={"model": "m", "input": "abc", "dimensions": 8})
    assert set(r.json()) == {"model", "embeddings", "total_duration", "load_duration", "prompt_eval_count"}
    assert len(r.json()["embeddings"][0]) == 8 and r.json()["prompt_eval_count"] == 3
    assert client.post("/api/embeddings", json={"model": "m", "prompt": ""}).json() == {"embedding": []}
    assert client.post("/api/embed", json={"model": "m", "input": []}).json()["embeddings"] == []
    assert client.post("/api/show", json={"model": "m"}).json()["capabilities"] == ["embedding"]
    r = client.post("/api/chat", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "'m'" in r.json()["error"]


def test_tasks_from_folders(tmp_path) -> None:
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_task("auto", tmp_path, None) == "generate"
    assert resolve_task("embed", tmp_path, None) == "embed"
    write_st_files(tmp_path, "cls", normalize=False)
    assert resolve_task("auto", tmp_path, None) == "embed"
    assert read_embedding_spec(tmp_path) == EmbeddingSpec("cls", normalize=False, declared=True)
    (tmp_path / "config.json").write_text(json.dumps({**config, "is_original_qwen3_reranker": True}))
    assert resolve_task("auto", tmp_path, None) == "score" and read_rerank_spec(tmp_path).yes_token == "yes"
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3Model"], "matryoshka_dimensions": [32]}))
    assert read_embedding_spec(tmp_path).matryoshka == (32,)
    for task in ("generate", "score"):  # no LM head
        with pytest.raises(ValueError, match="no LM head"):
            resolve_task(task, tmp_path, None)
    pooling = json.loads((tmp_path / "1_Pooling" / "config.json").read_text())
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "pooling_mode_max_tokens": True}))
    with pytest.raises(ValueError, match="unsupported"):
        read_embedding_spec(tmp_path)
