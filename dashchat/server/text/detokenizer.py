"""Token ids -> text, incrementally, without ever emitting a broken character or a stop string.

Text is built from each token's raw bytes through an incremental UTF-8 decoder, so a
character split across tokens (CJK, emoji) is held until it is complete. Stop strings are
found in the decoded text; a tail that could still grow into a stop string is held back,
so a stop never leaks even when it spans tokens in a stream.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Sequence
from typing import Protocol


class _Tokenizer(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...
    def token_bytes(self, token_id: int) -> bytes: ...


class TokenPieces:
    """Per-tokenizer cache of each token's bytes (b"" for special tokens when skipped).

    Shared by all requests; filled lazily so start-up does not walk a 150k vocab.
    """

    def __init__(self, tokenizer: _Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._special: set[int] = set(_special_ids(tokenizer))
        self._bytes: dict[int, bytes] = {}
        self._vocab_size: int | None = getattr(tokenizer, "vocab_size", None)

    def raw(self, token_id: int) -> bytes:
        b = self._bytes.get(token_id)
        if b is None:
            if token_id < 0 or (self._vocab_size is not None and token_id >= self._vocab_size):
                b = b""  # an id past the tokenizer's vocab (models pad their logits rows): no text
            else:
                # Any failure here is a bug that must be seen: it propagates (the request fails and
                # the error is logged with its id) instead of silently dropping the token's text.
                b = self.tokenizer.token_bytes(token_id)
            self._bytes[token_id] = b
        return b

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special

    def text(self, token_id: int) -> str:
        """Display form of one token (for logprobs)."""
        return self.raw(token_id).decode("utf-8", errors="replace")


def _special_ids(tokenizer: object) -> Iterable[int]:
    for attr in ("special_token_ids", "all_special_ids"):
        ids = getattr(tokenizer, attr, None)
        if ids is not None:
            return ids
    inner = getattr(tokenizer, "_tokenizer", None) or getattr(tokenizer, "tokenizer", None)
    added = getattr(inner, "get_added_tokens_decoder", None)
    if callable(added):  # tokenizers.Tokenizer
        return [i for i, t in added().items() if getattr(t, "special", False)]
    return ()


class IncrementalDetokenizer:
    def __init__(self, pieces: TokenPieces, skip_special_tokens: bool = True) -> None:
        self._pieces = pieces
        self._skip = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_ids: Sequence[int]) -> str:
        p = self._pieces
        if len(token_ids) == 1:  # the common streaming case
            t = token_ids[0]
            if self._skip and p.is_special(t):
                return ""
            return self._decoder.decode(p.raw(t))
        data = b"".join(p.raw(t) for t in token_ids if not (self._skip and p.is_special(t)))
        return self._decoder.decode(data)

    def flush(self) -> str:
        """End of sequence: an incomplete trailing character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)


class StopChecker:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None  # the stop string that was hit

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self.stops:
            return text, False
        buf = self._held + text
        # The stop that *completes* first wins, as if text arrived one character at a time,
        # so the result does not depend on how the text was split into tokens.
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stops:
            i = buf.find(s)
            if i != -1 and (best is None or (i + len(s), i) < best):
                best = (i + len(s), i)
        if best is not None:
            self._held = ""
            self.matched = buf[best[1] : best[0]]
            return buf[: best[1]], True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


class TextStream:
    """One choice's text: detokenize, then cut at stop strings."""

    def __init__(self, pieces: TokenPieces, stops: Sequence[str], skip_special_tokens: bool = True) -> None:
        self._detok = IncrementalDetokenizer(pieces, skip_special_tokens)
        self._stop = StopChecker(stops)
        self.stopped = False  # a stop string was hit: ignore further tokens

    def add(self, token_ids: Sequence[int]) -> str:
        if self.stopped:
            return ""
        text, self.stopped = self._stop.feed(self._detok.add(token_ids))
        return text

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text (vLLM's `stop_reason`), if one did."""
        return self._stop.matched

    def finish(self) -> str:
        """The sequence ended: release what was held back."""
        if self.stopped:
            return ""
        text, self.stopped = self._stop.feed(self._detok.flush())
        return text if self.stopped else text + self._stop.flush()
