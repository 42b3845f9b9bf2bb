"""The engine interface: what the server hands in and what it gets back.

Every engine (native, DashInfer) speaks these types, so nothing above the engine
knows which one runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Protocol, Sequence

import torch


class LogitsProcessor(Protocol):
    """Per-sequence hook run before sampling.

    Called with the sequence's generated token ids so far and its logits row
    (1-D, float32, vocab-sized); returns the row to sample from (may edit in place).
    """

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor: ...


LogitsProcessorFactory = Callable[[], LogitsProcessor]


class NotReady(Exception):
    """Raised by a logits processor that cannot decide this step (its grammar is still compiling):
    the engine samples nothing for that sequence this step and calls the processor again on a later
    step with the same tokens. The other sequences of the batch are not held up."""


@dataclass(eq=False)
class ImageInput:
    """One image of a prompt, preprocessed (dashchat/models/image_processing.py): the patches the
    vision tower reads and the run of placeholder tokens its embeddings replace."""

    pixel_values: torch.Tensor  # [t * h * w, 3 * temporal * patch * patch] float32
    grid: tuple[int, int, int]  # (t, h, w) in patches
    offset: int  # index in the prompt of its first placeholder token
    length: int  # its placeholder tokens (= its embeddings)
    digest: bytes  # content hash: the prefix cache keys these tokens by it, never by the placeholder ids


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    n: int = 1
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    # None: no logprobs; 0: logprob of the sampled token only; k: plus the top k.
    logprobs: int | None = None
    # One processor is made per sequence (n > 1 makes n), so processors may keep state.
    logits_processor_factories: list[LogitsProcessorFactory] = field(default_factory=list)
    # Prefix-cache partition: requests reuse each other's cached prompt blocks only when their salts
    # are equal (None is a salt of its own), so the time to first token cannot tell one tenant
    # what another sent. An engine without a prefix cache may ignore it.
    cache_salt: str | None = None
    # The prompt's images, in prompt order (a vision model's engine splices their embeddings in; an
    # engine without vision refuses a request that has any with UnsupportedFeature).
    images: list[ImageInput] = field(default_factory=list)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5 or self.top_k == 1


@dataclass
class PoolingParams:
    """A prefill-only request: run the prompt once and hand back its pooled final hidden state
    (the final norm applied, before the head). It never decodes. Normalising and truncating the
    vector is the caller's job (the engine returns what the model computed)."""

    pooling: str = "last"  # "last" token, "mean" over every position, or the first token ("cls")
    # Also return the logits of these token ids at the last position (a decoder reranker reads its
    # "yes" and "no" there).
    logit_token_ids: list[int] | None = None
    cache_salt: str | None = None  # as SamplingParams.cache_salt

    POOLINGS = ("last", "mean", "cls")


@dataclass
class PoolingOutput:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    hidden: torch.Tensor  # [hidden_size] float32 on the CPU
    logits: torch.Tensor | None = None  # [len(logit_token_ids)] float32, or None


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class CompletionDelta:
    """New tokens of one sequence (choice `index`) since the last output."""

    index: int
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    # "stop" (eos or stop id), "length" (max_tokens or context), "abort"; None while running.
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    num_prompt_tokens: int
    num_cached_tokens: int
    deltas: list[CompletionDelta]
    finished: bool


class EngineError(RuntimeError):
    """The engine could not serve a request (crash, shutdown). Fails that request only."""


class EngineDead(EngineError):
    """The engine's step thread died: every request, in flight or new, fails with this (the server
    answers 503 and /health says 503) until the process is restarted."""


class EngineOverloaded(EngineError):
    """The admission queue is full: the server answers 429."""


class PromptTooLong(EngineError):
    """Prompt (+ max_tokens) exceeds the context: the server answers 400 context_length_exceeded."""


def check_prompt(prompt_token_ids: Sequence[int], max_tokens: int, max_model_len: int, vocab_size: int) -> None:
    """The admission checks every engine makes before it accepts a request."""
    n_prompt = len(prompt_token_ids)
    if n_prompt == 0:
        raise PromptTooLong("the prompt is empty")
    if n_prompt + max_tokens > max_model_len:
        raise PromptTooLong(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion."
        )
    if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab_size:
        # Caught here, an out-of-range id fails its request only, not the whole batch's step.
        raise EngineError(f"prompt token ids must be in [0, {vocab_size})")


class UnsupportedFeature(EngineError):
    """A request asks for something this engine cannot do: the server answers 400."""


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of those, found cached
    num_preemptions: int = 0
    tensor_parallel_size: int = 1
    collective_seconds: float = 0.0  # rank 0's time in tensor-parallel collectives
    # Speculative decoding: steps that verified proposals, tokens proposed, of those accepted.
    spec_drafts: int = 0
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class Engine(Protocol):
    """What the server needs from an engine."""

    name: str
    max_model_len: int

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Yield outputs as tokens come; the last one has finished=True.

        Raises PromptTooLong / EngineOverloaded / UnsupportedFeature before the first
        output, EngineError later. Closing the iterator early (client gone) aborts.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    # Optional: engines that serve embedding / score models. The server answers 400 where an engine
    # lacks it.
    # async def pool(self, prompt_token_ids: list[int], params: PoolingParams, request_id: str)
    #     -> PoolingOutput: raises as generate() does before its first output; closing early aborts.

    def stats(self) -> EngineStats: ...

    def shutdown(self) -> None: ...
