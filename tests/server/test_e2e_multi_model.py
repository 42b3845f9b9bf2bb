"""Several models in one server (the model pool), on real servers over tiny random chat models
(SmolLM2's tokenizer and template, 2 layers: each loads in about a second).

Server `pool`: `--models-dir` with alpha, beta, a broken model and two projector GGUFs, at most one
model loaded at once. Server `configured`: a models file (names, per-model settings, a 1 s
keep-alive) behind an API key.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
from server_proc import ServerProcess, running
from tiny_models import save_stub_gguf, save_tiny_chat_model

MSG = [{"role": "user", "content": "hi"}]
KEY = "multi-key"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("models")
    for name in ("alpha", "beta"):
        (d / name).mkdir()
        save_tiny_chat_model(d / name)
    broken = d / "broken"  # resolves (config.json + safetensors) but fails to load
    broken.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (broken / f).write_bytes((d / "alpha" / f).read_bytes())
    (broken / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    save_stub_gguf(d / "mmproj-alpha-f16.gguf", "clip")
    save_stub_gguf(d / "vision-adapter.gguf", "clip")  # no mmproj in its name: known by its architecture
    (d / "README.txt").write_text("not a model")
    return d


def _until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        time.sleep(0.1)


def _status(base: str, headers: dict[str, str] | None = None) -> dict[str, dict[str, Any]]:
    body = httpx.get(f"{base}/v1/models", headers=headers or {}, timeout=30).json()
    return {m["id"]: m for m in body["data"]}


def _loaded(base: str, headers: dict[str, str] | None = None) -> set[str]:
    return {n for n, m in _status(base, headers).items() if m["status"]["loaded"]}


@pytest.fixture(scope="module")
def pool(models_dir: Path) -> Iterator[ServerProcess]:
    yield from running("--models-dir", str(models_dir), "--device", "cpu", "--kv-cache-memory", "0.25",
                       "--max-loaded-models", "1")


def test_models_dir_lists_models_not_projectors_and_loads_on_first_use(pool: ServerProcess) -> None:
    models = _status(pool.base_url)
    assert sorted(models) == ["alpha", "beta", "broken"]
    for m in models.values():  # OpenAI's fields intact, the load state beside them
        assert m["object"] == "model" and m["owned_by"] == "dashchat" and isinstance(m["created"], int)
        assert m["status"] == {"value": "unloaded", "loaded": False}
    assert models["alpha"]["max_model_len"] == 2048  # known before loading
    health = httpx.get(f"{pool.base_url}/health").json()
    assert health == {"status": "ok", "models": {"alpha": "unloaded", "beta": "unloaded", "broken": "unloaded"}}

    client = openai.OpenAI(base_url=f"{pool.base_url}/v1", api_key="none")
    a = client.chat.completions.create(model="alpha", messages=MSG, max_tokens=3)  # type: ignore[arg-type]
    assert a.model == "alpha" and a.usage is not None and a.usage.completion_tokens == 3
    assert _loaded(pool.base_url) == {"alpha"}
    # --max-loaded-models 1: beta's load unloads the idle alpha
    b = client.chat.completions.create(model="beta", messages=MSG, max_tokens=3)  # type: ignore[arg-type]
    assert b.model == "beta"
    assert _loaded(pool.base_url) == {"beta"}
    c = client.completions.create(model="alpha", prompt="hello", max_tokens=2)
    assert c.model == "alpha" and _loaded(pool.base_url) == {"alpha"}
    metrics = httpx.get(f"{pool.base_url}/metrics").text
    assert 'dashchat_model_unloads_total{model="beta",reason="lru"} 1.0' in metrics
    assert 'dashchat_model_loaded{model="alpha"} 1.0' in metrics

    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="mmproj-alpha-f16", messages=MSG)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"


def test_a_model_that_fails_to_load_is_a_503_with_retry_after(pool: ServerProcess) -> None:
    body = {"model": "broken", "messages": MSG, "max_tokens": 2}
    r = httpx.post(f"{pool.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
    assert r.json()["error"]["code"] == "model_unavailable" and "broken" in r.json()["error"]["message"]
    assert _status(pool.base_url)["broken"]["status"]["value"] == "error"
    # each API's own error shape
    r = httpx.post(f"{pool.base_url}/v1/messages", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 503 and r.json()["type"] == "error" and "retry-after" in r.headers
    r = httpx.post(f"{pool.base_url}/api/chat", json={"model": "broken", "messages": MSG}, timeout=60)
    assert r.status_code == 503 and isinstance(r.json()["error"], str) and "retry-after" in r.headers


def test_ollama_keep_alive_ps_and_tags(pool: ServerProcess) -> None:
    """/api/ps lists the loaded model with its expiry; keep_alive 0 unloads it after the request;
    /api/tags lists every model, loaded or not. (A request in flight holding its model against such
    an unload is checked in test_model_pool.py, where the test can hold a stream open for certain.)"""
    client = ollama.Client(host=pool.base_url, timeout=120)
    r = client.chat(model="alpha", messages=MSG, options={"num_predict": 2}, keep_alive="10m")
    assert r.done and r.eval_count == 2
    ps = client.ps().models
    assert [m.model for m in ps] == ["alpha:latest"] and ps[0].size > 0
    assert ps[0].expires_at is not None and ps[0].expires_at.timestamp() > time.time() + 500
    r = client.chat(model="alpha", messages=MSG, options={"num_predict": 2}, keep_alive=0)
    assert r.done and r.eval_count == 2
    _until(lambda: not client.ps().models, "keep_alive 0 unloads alpha")
    assert _loaded(pool.base_url) == set()
    assert {m.model for m in client.list().models} == {"alpha:latest", "beta:latest", "broken:latest"}
    load = client.generate(model="beta", prompt="")  # Ollama's way to load a model
    assert load.done_reason == "load" and _loaded(pool.base_url) == {"beta"}


@pytest.fixture(scope="module")
def configured(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    cfg = tmp_path_factory.mktemp("cfg") / "models.yaml"
    cfg.write_text(f"""
models:
  - path: {models_dir / "alpha"}
    served_model_name: [a1, a-two]
    keep_alive: 1
  - path: {models_dir / "beta"}
    args:
      max_model_len: 512
      default_chat_template_kwargs: {{"x": 1}}
""")
    yield from running("--models-config", str(cfg), "--device", "cpu", "--kv-cache-memory", "0.25",
                       "--api-key", KEY, "--keep-alive", "-1")


def test_models_file_names_settings_and_keep_alive(configured: ServerProcess) -> None:
    base, auth = configured.base_url, {"Authorization": f"Bearer {KEY}"}
    for path in ("/v1/models", "/api/ps", "/api/tags"):  # every route behind the key
        assert httpx.get(f"{base}{path}").status_code == 401
    models = _status(base, auth)
    assert sorted(models) == ["a-two", "a1", "beta"]
    assert models["beta"]["max_model_len"] == 512 and models["a1"]["max_model_len"] == 2048
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY)
    r = client.chat.completions.create(model="a-two", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert r.model == "a-two"
    b = client.chat.completions.create(model="beta", messages=MSG, max_tokens=2)  # type: ignore[arg-type]
    assert b.model == "beta"
    # alpha's keep-alive is 1 s; beta keeps the server's (--keep-alive -1: forever)
    _until(lambda: _loaded(base, auth) == {"beta"}, "alpha unloads after its 1 s keep-alive")
    assert _status(base, auth)["beta"]["status"]["loaded"]
    with pytest.raises(openai.BadRequestError):  # bad input stays a 400 in multi-model mode
        client.chat.completions.create(model="beta", messages=MSG, max_tokens=-1)  # type: ignore[arg-type]
