"""OpenAI request fields -> engine SamplingParams, with the checks that need the model."""

from __future__ import annotations

from dashchat.engine.types import LogitsProcessorFactory, SamplingParams
from dashchat.server.config import ServerConfig
from dashchat.server.plumbing.errors import bad_request, context_length_exceeded
from dashchat.server.plumbing.tenant import cache_salt
from dashchat.server.protocol import _SamplingFields


def stop_list(stop: str | list[str] | None, cfg: ServerConfig) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > cfg.max_stop:
        raise bad_request(f"'stop' takes at most {cfg.max_stop} sequences.", "stop")
    return [s for s in stops if s]


def check_n(n: int, cfg: ServerConfig) -> None:
    if n > cfg.max_n:
        raise bad_request(f"'n' must be at most {cfg.max_n}; got {n}.", "n")


def parse_logit_bias(bias: dict[str, float] | None, vocab_size: int, cfg: ServerConfig) -> dict[int, float] | None:
    if not bias:
        return None
    if len(bias) > cfg.max_logit_bias:
        raise bad_request(f"'logit_bias' takes at most {cfg.max_logit_bias} entries.", "logit_bias")
    out: dict[int, float] = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except ValueError:
            raise bad_request(f"Invalid key in 'logit_bias': {key!r} is not a token id.", "logit_bias") from None
        if not 0 <= tid < vocab_size:
            raise bad_request(f"Token id {tid} in 'logit_bias' is out of vocabulary [0, {vocab_size}).", "logit_bias")
        if not -100.0 <= value <= 100.0:
            raise bad_request(f"'logit_bias' values must be in [-100, 100]; got {value}.", "logit_bias")
        out[tid] = float(value)
    return out


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int, param: str) -> int:
    """Requested completion length, or all the context left; 400 when it cannot fit."""
    room = max_model_len - prompt_len
    if requested is None:
        if room < 1:
            raise context_length_exceeded(max_model_len, prompt_len, None, param)
        return room
    if requested > room:
        raise context_length_exceeded(max_model_len, prompt_len, requested, param)
    return requested


def build_params(
    req: _SamplingFields,
    *,
    max_tokens: int,
    vocab_size: int,
    cfg: ServerConfig,
    logprobs: int | None = None,
    factories: list[LogitsProcessorFactory] | None = None,
) -> SamplingParams:
    check_n(req.n, cfg)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        logit_bias=parse_logit_bias(req.logit_bias, vocab_size, cfg),
        seed=req.seed,
        n=req.n,
        min_tokens=min(req.min_tokens, max_tokens),
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        logits_processor_factories=list(factories or []),
        cache_salt=cache_salt(req.cache_salt),  # the API key's tenant, and the request's own salt
    )
