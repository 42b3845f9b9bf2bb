"""Embeddings on a real server (127.0.0.1) through the clients people use: the `openai` SDK (float
and base64), LangChain's OpenAIEmbeddings, the `ollama` client; and a tiny random Qwen3 reranker
served for scores (in-process, real engine) against transformers' yes/no softmax of the same prompt."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import ollama
import openai
import pytest
import torch
from server_proc import ServerProcess, running
from starlette.testclient import TestClient
from tiny_embeddings import write_reranker, write_st_model

from dashchat.engine.args import EngineArgs
from dashchat.engine.native.llm_engine import AsyncLLMEngine
from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig

KEY = "sk-embed-test"
TEXTS = ["hello world", "a", "the quick brown fox jumps over the lazy dog"]
DOCS = ["Paris is the capital of France.", "Bananas are yellow.", "no"]
SMALL = ("--device", "cpu", "--kv-cache-memory", "0.02", "--max-model-len", "512")


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory) -> str:
    return str(write_st_model(tmp_path_factory.mktemp("emb") / "tiny-embed", "last"))


@pytest.fixture(scope="module")
def embed_server(st_dir: str) -> Iterator[ServerProcess]:
    yield from running("--model-path", st_dir, *SMALL, "--api-key", KEY)


@pytest.fixture(scope="module")
def st_vectors(st_dir: str) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(st_dir, device="cpu")
    return np.stack([model.encode(t) for t in TEXTS])


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=KEY, max_retries=0, timeout=120)


def test_openai_sdk_float_and_base64(embed_server: ServerProcess, st_vectors: np.ndarray) -> None:
    client = _client(embed_server)
    # Without encoding_format the SDK asks for base64 and decodes it (little-endian float32) itself.
    for fmt in ("float", openai.NOT_GIVEN):
        r = client.embeddings.create(model="tiny-embed", input=TEXTS, encoding_format=fmt)
        got = np.array([d.embedding for d in sorted(r.data, key=lambda d: d.index)])
        np.testing.assert_allclose(got, st_vectors, atol=1e-5)
        assert r.usage.prompt_tokens == r.usage.total_tokens == sum(len(t.encode()) for t in TEXTS)
    raw = client.embeddings.create(model="tiny-embed", input=TEXTS[1], encoding_format="base64").data[0].embedding
    np.testing.assert_allclose(np.frombuffer(base64.b64decode(raw), dtype="<f4"), st_vectors[1], atol=1e-5)
    one = client.embeddings.create(model="tiny-embed", input=[104, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100])
    np.testing.assert_allclose(one.data[0].embedding, st_vectors[0], atol=1e-5)


def test_langchain_and_ollama_clients(embed_server: ServerProcess, st_vectors: np.ndarray) -> None:
    from langchain_openai import OpenAIEmbeddings

    lc = OpenAIEmbeddings(model="tiny-embed", base_url=f"{embed_server.base_url}/v1", api_key=KEY,
                          check_embedding_ctx_length=False, max_retries=0)
    np.testing.assert_allclose(np.array(lc.embed_documents(TEXTS)), st_vectors, atol=1e-5)
    np.testing.assert_allclose(np.array(lc.embed_query(TEXTS[0])), st_vectors[0], atol=1e-5)
    client = ollama.Client(host=embed_server.base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
    r = client.embed(model="tiny-embed:latest", input=TEXTS)
    np.testing.assert_allclose(np.array(r.embeddings), st_vectors, atol=1e-5)
    assert r.prompt_eval_count == sum(len(t.encode()) for t in TEXTS) and r.total_duration > 0
    cut = client.embed(model="tiny-embed", input="x" * 600)  # Ollama's default: cut to the context
    assert len(cut.embeddings[0]) == 64 and cut.prompt_eval_count == 512
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny-embed", input="x" * 600, truncate=False)
    assert err.value.status_code == 400


def test_errors_and_routes_for_other_tasks(embed_server: ServerProcess) -> None:
    client = _client(embed_server)
    with pytest.raises(openai.BadRequestError) as err:  # no Matryoshka declared
        client.embeddings.create(model="tiny-embed", input="x", dimensions=8)
    assert err.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as err:  # an embedding model does not chat
        client.chat.completions.create(model="tiny-embed", messages=[{"role": "user", "content": "hi"}])
    assert "tiny-embed" in err.value.message and err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="tiny-embed", input=["ok", ""])
    assert err.value.body["param"] == "input[1]"
    with pytest.raises(openai.BadRequestError) as err:
        client.embeddings.create(model="tiny-embed", input="x" * 600)
    assert err.value.code == "context_length_exceeded"
    for path in ("/v1/embeddings", "/v1/rerank", "/rerank", "/score", "/api/embed"):  # behind the key
        assert httpx.post(f"{embed_server.base_url}{path}", json={}, timeout=30).status_code == 401
    # an embedding model scores by cosine similarity
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{embed_server.base_url}/score", headers=headers, timeout=60,
                   json={"text_1": TEXTS[0], "text_2": [TEXTS[0], TEXTS[1]]}).json()
    assert r["data"][0]["score"] == pytest.approx(1.0, abs=1e-5) and r["data"][1]["score"] < 1


@pytest.fixture(scope="module")
def rerank_dir(tmp_path_factory) -> str:
    return str(write_reranker(tmp_path_factory.mktemp("rr") / "tiny-rerank"))


@pytest.fixture(scope="module")
def rerank_client(rerank_dir: str) -> Iterator[TestClient]:
    """The app in-process on the real engine (a second server process would double the start-up)."""
    engine = AsyncLLMEngine.from_args(EngineArgs(model_dir=rerank_dir, max_model_len=512, kv_cache_memory_gb=0.02))
    with TestClient(build_app(engine, ServerConfig(["tiny-rerank"], task="score"))) as client:
        yield client


def _reference_scores(path: str, query: str, docs: list[str]) -> list[float]:
    """Qwen3-Reranker's model-card computation, in transformers."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
              'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n')
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    instruction = "Given a web search query, retrieve relevant passages that answer the query"
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    scores = []
    for doc in docs:
        text = f"{prefix}<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {doc}{suffix}"
        with torch.no_grad():
            logits = model(torch.tensor([tok(text)["input_ids"]])).logits[0, -1, [no, yes]]
        scores.append(torch.softmax(logits, 0)[1].item())
    return scores


def test_rerank_and_score_match_transformers(rerank_client: TestClient, rerank_dir: str) -> None:
    query = "What is the capital of France?"
    want = _reference_scores(rerank_dir, query, DOCS)
    client = rerank_client
    r = client.post("/v1/rerank", json={"query": query, "documents": [DOCS[0], {"text": DOCS[1]}, DOCS[2]],
                                           "top_n": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    order = sorted(range(3), key=lambda i: -want[i])[:2]
    assert [x["index"] for x in body["results"]] == order
    for x in body["results"]:
        assert x["relevance_score"] == pytest.approx(want[x["index"]], abs=1e-4)
        assert x["document"]["text"] == DOCS[x["index"]]
    assert body["usage"]["total_tokens"] > 0
    r = client.post("/score", json={"text_1": query, "text_2": DOCS}).json()
    assert [d["index"] for d in r["data"]] == [0, 1, 2] and r["data"][0]["object"] == "score"
    assert [d["score"] for d in r["data"]] == pytest.approx(want, abs=1e-4)
    # a reranker serves neither embeddings nor chat: a 400 naming it
    for path, body in (("/v1/embeddings", {"input": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        r = client.post(path, json=body)
        assert r.status_code == 400 and "tiny-rerank" in r.json()["error"]["message"]
    r = client.post("/score", json={"text_1": ["a", "b"], "text_2": ["c", "d", "e"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "text_2"
