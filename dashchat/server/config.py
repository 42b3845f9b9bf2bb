"""Everything the HTTP layer needs to know that is not the engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashchat.server.media.image_fetch import ImageFetchPolicy


@dataclass
class ServerConfig:
    served_model_names: list[str]  # this model's (ServerState's own: the first model's)
    chat_template: str | None = None  # template text (file already read), None: the model's own
    api_keys: list[str] = field(default_factory=list)  # empty: no auth
    allowed_origins: list[str] = field(default_factory=list)  # empty: CORS off
    # Limits. Each is a CLI flag; see openai_server.py for the help text.
    max_request_bytes: int = 8 * 1024 * 1024
    max_messages: int = 1024
    max_tools: int = 128
    max_n: int = 16
    max_stop: int = 4
    max_logit_bias: int = 300
    request_timeout_s: float = 600.0
    shutdown_grace_s: float = 30.0
    retry_after_s: int = 1
    log_prompts: bool = False
    enable_docs: bool = False  # /docs and /openapi.json (Swagger UI comes from a CDN: off unless asked)
    # /v1/responses store (routes/response_store.py): least recently used go first past either bound.
    responses_store_entries: int = 1024
    responses_store_bytes: int = 64 * 1024 * 1024
    # Reasoning models: a reasoning.FORMATS name, "none", or None to detect it from the
    # chat template; template variables every request gets unless it sets them itself.
    reasoning_parser: str | None = None
    default_chat_template_kwargs: dict[str, Any] = field(default_factory=dict)
    # What the model is served for (models/pooling.py TASKS): auto reads its folder.
    task: str = "auto"
    engine_name: str = "native"  # /version's answer while no model is loaded
    web_ui: bool = True  # the chat page at / (off: --no-web-ui)
    # Chat messages' text may become special tokens (`<|im_end|>` typed by a user ends the turn): the old,
    # unsafe behaviour, for callers that rely on it (text/control_tokens.py).
    allow_special_tokens_in_content: bool = False
    # Grammar compiles (text/grammar_compile.py): their own threads, run this much below the server's
    # CPU priority; a request waits at most the timeout (then 400: schema too complex); cache bound.
    grammar_compile_threads: int = 1
    grammar_compile_timeout_s: float = 10.0
    grammar_compile_nice: int = 10
    grammar_cache_bytes: int = 256 * 1024 * 1024
    # Images (media/images.py): most per request by modality (vLLM's --limit-mm-per-prompt) and the
    # resized area's bounds (None: the model's preprocessor_config.json).
    limit_mm_per_prompt: dict[str, int] = field(default_factory=lambda: {"image": 4})
    mm_min_pixels: int | None = None
    mm_max_pixels: int | None = None
    # Which image URLs the server may fetch (media/image_fetch.py); the default fetches none.
    image_fetch: ImageFetchPolicy = field(default_factory=ImageFetchPolicy)

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]
