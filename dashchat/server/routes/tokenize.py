"""POST /tokenize and POST /detokenize, in vLLM's shapes.

/tokenize takes a `prompt`, or chat `messages` rendered exactly as /v1/chat/completions renders
them (same template, tools, chat_template_kwargs), and answers `tokens`, `count`, `max_model_len`
(and `token_strs` on request). /detokenize turns `tokens` back into the `prompt` text.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response

from dashchat.server.plumbing.errors import bad_request
from dashchat.server.protocol import DetokenizeRequest, TokenizeRequest
from dashchat.server.plumbing.sse import dumps
from dashchat.server.state import ModelView, ServerState
from dashchat.server.text.pipeline import render_prompt, template_kwargs
from dashchat.server.media.images import expand_images, for_template, load_images


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def add_tokenize_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/tokenize", response_model=None)
    async def tokenize(body: TokenizeRequest) -> Response:
        view = await state.use_model(body.model)
        images = []
        if body.messages is not None:  # image parts count as the tokens they become
            _, urls = for_template([m.model_dump(exclude_none=True) for m in body.messages])
            images = await load_images(view, view.name, urls)
        return _JSON(await asyncio.to_thread(_tokenize, view, body, images))

    @app.post("/detokenize", response_model=None)
    async def detokenize(body: DetokenizeRequest) -> Response:
        return _JSON(await asyncio.to_thread(_detokenize, await state.use_model(body.model), body))


def _tokenize(state: ModelView, req: TokenizeRequest, images: list[Any] = ()) -> dict[str, Any]:
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("Send exactly one of 'prompt' or 'messages'.", "prompt" if req.prompt is None else "messages")
    if req.prompt is not None:
        if req.tools is not None or req.chat_template_kwargs is not None:
            raise bad_request("'tools' and 'chat_template_kwargs' apply to 'messages' only.",
                              "tools" if req.tools is not None else "chat_template_kwargs")
        add_special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = state.tokenizer.encode(req.prompt, add_special_tokens=add_special)
    else:
        ids, _ = expand_images(_chat_tokens(state, req), list(images), state.model.vision)
    body: dict[str, Any] = {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids,
                            "token_strs": None}
    if req.return_token_strs:
        body["token_strs"] = [_token_str(state, i) for i in ids]
    return body


def _chat_tokens(state: ModelView, req: TokenizeRequest) -> list[int]:
    cfg = state.cfg
    assert req.messages is not None
    if len(req.messages) > cfg.max_messages:
        raise bad_request(f"'messages' takes at most {cfg.max_messages} entries.", "messages")
    if req.continue_final_message and req.add_generation_prompt:
        raise bad_request("'continue_final_message' needs 'add_generation_prompt': false.", "continue_final_message")
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if len(tools) > cfg.max_tools:
        raise bad_request(f"'tools' takes at most {cfg.max_tools} entries.", "tools")
    messages, _ = for_template([m.model_dump(exclude_none=True) for m in req.messages])
    for i, m in enumerate(req.messages):
        if isinstance(m.content, list) and any((p.type != "text" or p.text is None) and p.type != "image_url"
                                               for p in m.content):
            raise bad_request("Only text and image_url content parts are supported.", f"messages[{i}].content")
    kwargs = template_kwargs(state, req.chat_template_kwargs)
    prompt = render_prompt(state, messages, tools, kwargs, add_generation_prompt=req.add_generation_prompt)
    marked = prompt.marked
    if req.continue_final_message:  # the prompt ends where the last message's text does: the model continues it
        last = messages[-1].get("content")
        last_text = last if isinstance(last, str) else "\n".join(p.get("text", "") for p in last or [])
        last_text = state.guard.shield(last_text)
        end = marked.rfind(last_text) if last_text else -1
        if end < 0:
            raise bad_request("The chat template does not show the final message's text; cannot continue it.",
                              "continue_final_message")
        marked = marked[: end + len(last_text)]
    elif not req.add_special_tokens:
        return prompt.ids
    return state.guard.encode(marked, add_special_tokens=bool(req.add_special_tokens))


def _token_str(state: ModelView, token_id: int) -> str:
    piece = getattr(state.tokenizer, "id_to_token", None)
    text = piece(token_id) if piece is not None else None
    return text if isinstance(text, str) else state.pieces.text(token_id)


def _detokenize(state: ModelView, req: DetokenizeRequest) -> dict[str, Any]:
    bad = next((t for t in req.tokens if not 0 <= t < state.vocab_size), None)
    if bad is not None:
        raise bad_request(f"Token id {bad} in 'tokens' is outside the vocabulary [0, {state.vocab_size}).", "tokens")
    return {"prompt": state.tokenizer.decode(req.tokens, skip_special_tokens=False)}
