"""POST /v1/rerank, /rerank, /v2/rerank (Jina / Cohere shape) and /score (vLLM's shape).

A model served with `--task score` (or whose config says it is a decoder reranker) is read as
Qwen3-Reranker is: each (query, document) pair is rendered in its prompt, and the score is the
softmax of the "yes" and "no" logits at the last position, P(yes). The engine computes those two
logits in a pooling request (`PoolingParams.logit_token_ids`). An embedding model scores a pair by
the cosine similarity of their embeddings, as vLLM does.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import torch
from pydantic import BaseModel, Field

from dashchat.engine.types import PoolingParams
from dashchat.models.pooling import RerankSpec
from dashchat.server.plumbing.errors import bad_request
from dashchat.server.plumbing.tenant import cache_salt
from dashchat.server.protocol import _Model
from dashchat.server.routes.embeddings import (
    MAX_INPUTS,
    check_prompt_ids,
    embed,
    json_response,
    pool_all,
    require_task,
)
from dashchat.server.state import ServedModel, ServerState

# Qwen3-Reranker's prompt (its model card): the pair sits between these, in <Instruct>/<Query>/<Document> lines.
SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
          'Note that the answer can only be "yes" or "no".')
PREFIX = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n"
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


class _Document(BaseModel):
    text: str


class RerankRequest(_Model):
    model: str | None = None
    query: str
    documents: list[str | _Document] = Field(max_length=MAX_INPUTS)
    top_n: int | None = Field(default=None, ge=0)
    return_documents: bool = True
    instruction: str | None = None  # the reranker's <Instruct> line (default: web search)
    cache_salt: str | None = None


class ScoreRequest(_Model):
    model: str | None = None
    text_1: str | list[str] = Field(union_mode="left_to_right")
    text_2: str | list[str] = Field(union_mode="left_to_right")
    instruction: str | None = None
    cache_salt: str | None = None


def reranker_prompt(served: ServedModel, instruction: str | None, query: str, document: str) -> list[int]:
    """The pair in Qwen3-Reranker's prompt. The client's text never becomes a special token."""
    body = f"<Instruct>: {instruction or DEFAULT_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
    return served.tokenizer.encode_segments([(PREFIX, False), (body, True), (SUFFIX, False)])


def _yes_no_ids(served: ServedModel, name: str) -> list[int]:
    spec = getattr(served, "pooling", None)
    spec = spec if isinstance(spec, RerankSpec) else RerankSpec()
    ids = [served.tokenizer.token_to_id(spec.no_token), served.tokenizer.token_to_id(spec.yes_token)]
    if None in ids:
        raise bad_request(f"The model '{name}' has no single '{spec.yes_token}' / '{spec.no_token}' tokens to "
                          "score with.", "model")
    return ids  # type: ignore[return-value]


async def score_pairs(served: ServedModel, name: str, pairs: list[tuple[str, str]], instruction: str | None,
                      salt: str | None, request_id: str, params: tuple[str, str]) -> tuple[list[float], int]:
    """Scores of (query, document) pairs, and the prompt tokens they took. `params` names the
    request's fields (query side, document side) in errors."""
    if getattr(served, "task", None) == "embed":
        return await _cosine_scores(served, pairs, salt, request_id, params)
    ids = _yes_no_ids(served, name)

    def render() -> list[list[int]]:
        prompts = []
        for i, (query, doc) in enumerate(pairs):
            prompt = reranker_prompt(served, instruction, query, doc)
            check_prompt_ids(served, prompt, f"{params[1]}[{i}]")
            prompts.append(prompt)
        return prompts

    prompts = await asyncio.to_thread(render)
    outputs = await pool_all(served, prompts, PoolingParams("last", ids, cache_salt(salt)), request_id)
    scores = [torch.softmax(o.logits.float(), dim=0)[1].item() for o in outputs]  # P(yes) of [no, yes]
    return scores, sum(len(p) for p in prompts)


async def _cosine_scores(served: ServedModel, pairs: list[tuple[str, str]], salt: str | None, request_id: str,
                         params: tuple[str, str]) -> tuple[list[float], int]:
    texts = sorted({t for pair in pairs for t in pair})

    def encode() -> list[list[int]]:
        prompts = []
        for text in texts:
            ids = served.tokenizer.encode(text, add_special_tokens=True)
            check_prompt_ids(served, ids, params[0] if text in (p[0] for p in pairs) else params[1])
            prompts.append(ids)
        return prompts

    prompts = await asyncio.to_thread(encode)
    vectors, tokens = await embed(served, prompts, None, request_id, salt)
    at = {t: torch.nn.functional.normalize(v, dim=0) for t, v in zip(texts, vectors)}
    return [float(at[q] @ at[d]) for q, d in pairs], tokens


async def create_rerank(state: ServerState, req: RerankRequest, path: str) -> Any:
    view = await state.use_model(req.model)
    name = view.name
    served = require_task(state, name, "score", view.served)
    docs = [d if isinstance(d, str) else d.text for d in req.documents]
    request_id = f"rerank-{uuid.uuid4().hex}"

    async def work() -> dict[str, Any]:
        if not docs:
            return {"id": request_id, "model": name, "results": [], "usage": {"prompt_tokens": 0, "total_tokens": 0}}
        scores, tokens = await score_pairs(served, name, [(req.query, d) for d in docs], req.instruction,
                                           req.cache_salt, request_id, ("query", "documents"))
        order = sorted(range(len(docs)), key=lambda i: -scores[i])
        if req.top_n:
            order = order[: req.top_n]
        results = []
        for i in order:
            result: dict[str, Any] = {"index": i, "relevance_score": scores[i]}
            if req.return_documents:
                result["document"] = {"text": docs[i]}
            results.append(result)
        return {"id": request_id, "model": name, "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return json_response(state, path, request_id, work)


def _score_pairs(req: ScoreRequest) -> list[tuple[str, str]]:
    """vLLM's pairing: one text_1 goes with every text_2; lists of equal length pair up."""
    left = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    right = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not left or not right:
        raise bad_request("'text_1' and 'text_2' must not be empty.", "text_1" if not left else "text_2")
    if len(left) == 1:
        left = left * len(right)
    if len(left) != len(right):
        raise bad_request(f"'text_1' has {len(left)} texts and 'text_2' {len(right)}: give one text_1, or as "
                          "many as text_2.", "text_2")
    if len(right) > MAX_INPUTS:
        raise bad_request(f"'text_2' takes at most {MAX_INPUTS} entries.", "text_2")
    return list(zip(left, right))


async def create_score(state: ServerState, req: ScoreRequest) -> Any:
    view = await state.use_model(req.model)
    name = view.name
    served = require_task(state, name, "score", view.served)
    pairs = _score_pairs(req)
    request_id = f"score-{uuid.uuid4().hex}"
    created = int(time.time())

    async def work() -> dict[str, Any]:
        scores, tokens = await score_pairs(served, name, pairs, req.instruction, req.cache_salt, request_id,
                                           ("text_1", "text_2"))
        return {"id": request_id, "object": "list", "created": created, "model": name,
                "data": [{"index": i, "object": "score", "score": s} for i, s in enumerate(scores)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    return json_response(state, "/score", request_id, work)


def add_rerank_routes(app: Any, state: ServerState) -> None:
    for path in ("/v1/rerank", "/rerank", "/v2/rerank"):
        def route(path: str = path) -> None:
            @app.post(path, response_model=None)
            async def rerank(body: RerankRequest) -> Any:
                return await create_rerank(state, body, path)
        route()

    @app.post("/score", response_model=None)
    async def score(body: ScoreRequest) -> Any:
        return await create_score(state, body)

    @app.post("/v1/score", response_model=None)
    async def score_v1(body: ScoreRequest) -> Any:
        return await create_score(state, body)
