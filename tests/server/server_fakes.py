"""A byte-level tokenizer and a scripted engine, for fast in-process tests of the HTTP layer.

They speak the real interfaces (dashchat.engine.types); the end-to-end tests use the real engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

from dashchat.engine.types import (
    CompletionDelta,
    EngineOverloaded,
    EngineStats,
    PoolingOutput,
    PoolingParams,
    PromptTooLong,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)

EOS = 256
SPECIAL = {256: "<|end|>", 257: "<|start|>"}


class ByteTokenizer:
    """Token i < 256 is byte i; 256/257 are special; 258+ are multi-byte pieces."""

    MERGES = [b"Hello", b" world", "你好".encode(), "😀".encode()[:2], "😀".encode()[2:]]

    def __init__(self) -> None:
        self.vocab_size = 258 + len(self.MERGES)
        self.eos_token_ids = {EOS}
        self.bos_token = None
        self.eos_token = SPECIAL[EOS]
        self.chat_template = (
            "{% for m in messages %}<|start|>{{ m.role }}\n{{ m.content }}<|end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
        )
        self.special_token_ids = set(SPECIAL)

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        if token_id in SPECIAL:
            return SPECIAL[token_id].encode()
        return self.MERGES[token_id - 258]

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        data = text.encode()
        out: list[int] = []
        i = 0
        while i < len(data):
            for j, m in enumerate(self.MERGES):
                if data.startswith(m, i):
                    out.append(258 + j)
                    i += len(m)
                    break
            else:
                out.append(data[i])
                i += 1
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return b"".join(
            self.token_bytes(t) for t in ids if not (skip_special_tokens and t in SPECIAL)
        ).decode("utf-8", errors="replace")


class ScriptedEngine:
    """Replies `reply` (tokenized), one token per output (or `tokens_per_output`, as speculative
    decoding gives them); honours max_tokens, n, logprobs."""

    name = "scripted"

    def __init__(self, reply: str = "Hello world", max_model_len: int = 256, delay: float = 0.0,
                 max_running: int | None = None, tokens_per_output: int = 1) -> None:
        self.tokenizer = ByteTokenizer()
        self.vocab_size = self.tokenizer.vocab_size
        self.max_model_len = max_model_len
        self.reply = reply
        self.delay = delay
        self.max_running = max_running
        self.tokens_per_output = tokens_per_output
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.finished: list[str] = []
        self.last_params: SamplingParams | None = None
        self.last_prompt: list[int] = []

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise PromptTooLong("too long")
        if self.max_running is not None and len(self.running) >= self.max_running:
            raise EngineOverloaded("full")
        self.last_params = params
        self.last_prompt = list(prompt_token_ids)
        self.running.add(request_id)
        ids = self.tokenizer.encode(self.reply) + [EOS]
        ids = ids[: params.max_tokens]
        try:
            for first in range(0, len(ids), self.tokens_per_output):
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
                chunk = ids[first : first + self.tokens_per_output]
                step = first + len(chunk) - 1
                deltas = []
                done = step == len(ids) - 1
                for i in range(params.n):
                    reason = None
                    if done:
                        reason = "stop" if chunk[-1] == EOS else "length"
                    lps = None
                    if params.logprobs is not None:
                        lps = [TokenLogprob(t, -0.5, [(t, -0.5), (65, -1.5), (66, -2.5)][: params.logprobs])
                               for t in chunk]
                    deltas.append(CompletionDelta(i, chunk, lps, reason))
                yield RequestOutput(request_id, len(prompt_token_ids), 0, deltas, done)
                if done:
                    break
            self.finished.append(request_id)
        finally:
            if request_id not in self.finished:
                self.aborted.append(request_id)
            self.running.discard(request_id)

    async def abort(self, request_id: str) -> None:
        if request_id in self.running and request_id not in self.aborted:
            self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(num_running=len(self.running), kv_blocks_total=100)

    def shutdown(self) -> None:
        pass


class PoolingEngine(ScriptedEngine):
    """ScriptedEngine that also serves pooling requests: the vector is a seeded random one per prompt,
    the logits of the tokens asked for likewise. Its tokenizer reads a word ("yes", "no") as the
    token of its first byte and renders `(text, literal)` segments as plain text."""

    def __init__(self, hidden_size: int = 16, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.hidden_size = hidden_size
        tok = self.tokenizer
        tok.token_to_id = lambda token: tok.encode(token)[0] if token else None  # type: ignore[attr-defined]
        tok.encode_segments = lambda segments, add_special_tokens=False: [  # type: ignore[attr-defined]
            t for text, _ in segments for t in tok.encode(text)]

    async def pool(self, prompt_token_ids: list[int], params: PoolingParams, request_id: str) -> PoolingOutput:
        import torch

        if not prompt_token_ids or len(prompt_token_ids) > self.max_model_len:
            raise PromptTooLong("too long")
        await asyncio.sleep(0)
        gen = torch.Generator().manual_seed(hash(tuple(prompt_token_ids)) % 2**31)
        logits = torch.randn(len(params.logit_token_ids), generator=gen) if params.logit_token_ids else None
        return PoolingOutput(request_id, len(prompt_token_ids), 0, torch.randn(self.hidden_size, generator=gen),
                             logits)
