"""Engine TokenLogprobs -> OpenAI's logprobs shapes (chat and legacy completions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dashchat.engine.types import TokenLogprob
from dashchat.server.text.detokenizer import TokenPieces

_FLOOR = -9999.0  # -inf is not JSON; OpenAI reports this floor instead


def _lp(x: float) -> float:
    return max(_FLOOR, x)


def chat_entries(pieces: TokenPieces, lps: Sequence[TokenLogprob], top_n: int) -> list[dict[str, Any]]:
    out = []
    for lp in lps:
        if pieces.is_special(lp.token_id):  # the end-of-turn token is not part of the content
            continue
        raw = pieces.raw(lp.token_id)
        out.append({
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": _lp(lp.logprob),
            "bytes": list(raw),
            "top_logprobs": [
                {"token": pieces.text(t), "logprob": _lp(v), "bytes": list(pieces.raw(t))}
                for t, v in lp.top[:top_n]
            ],
        })
    return out


def completion_logprobs(
    pieces: TokenPieces, lps: Sequence[TokenLogprob], top_n: int, offset: int
) -> dict[str, Any]:
    """Legacy /v1/completions form: parallel lists; text_offset counts from `offset`."""
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in lps:
        if pieces.is_special(lp.token_id):
            continue
        tok = pieces.text(lp.token_id)
        tokens.append(tok)
        token_lps.append(_lp(lp.logprob))
        tops.append({pieces.text(t): _lp(v) for t, v in lp.top[:top_n]} if top_n else None)
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}
