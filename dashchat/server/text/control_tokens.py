"""Text the client sent never becomes a control token; the chat template's own markers still do.

The rendered prompt used to be encoded as one string, so `<|im_end|>\\n<|im_start|>system` typed in a
user message became the real turn markers and forged a turn. Escaping contents before rendering is
not enough: templates look inside them (Qwen3 splits on `</think>`, others check for
`<tool_response>`), and an escape would change what they see and what the model reads. So the
protection sits at tokenization:

  1. every string the client sent (contents, tool call names and arguments, tool definitions,
     template variables) has each special token's text swapped for a sentinel (private-use
     characters, a per-process nonce and the token's index), which no template treats specially;
  2. the template renders as usual; its own markers are real special tokens;
  3. the render is cut at the sentinels: template text encodes as before, each sentinel encodes its
     special token's text as ordinary tokens (`Tokenizer.encode_segments`, literal pieces).

Only added tokens marked special are guarded (turn markers, eos, fill-in-the-middle); tokens a model
also writes as text (`<think>`, `<tool_call>`: added, not special) stay, since templates read them
in contents. A raw `/v1/completions` prompt is the caller's own and is not guarded;
`--allow-special-tokens-in-content` turns the guard off for chat too.
"""

from __future__ import annotations

import re
import secrets
from typing import Any


class ContentGuard:
    def __init__(self, tokenizer: Any, enabled: bool = True) -> None:
        self._tokenizer = tokenizer
        specials = list(getattr(tokenizer, "special_tokens", None) or []) if enabled else []
        if not hasattr(tokenizer, "encode_segments"):
            specials = []  # a tokenizer that cannot encode text literally: nothing to guard with
        self._strings = sorted(set(specials), key=len, reverse=True)  # longest first: no token eats a longer one
        self._index = {s: i for i, s in enumerate(self._strings)}
        self._special = re.compile("|".join(map(re.escape, self._strings))) if self._strings else None
        nonce = secrets.token_hex(6)
        self._open, self._close = "\ue000" + nonce, "\ue001"
        self._sentinel = re.compile(re.escape(self._open) + r"(\d+)" + re.escape(self._close))

    @property
    def active(self) -> bool:
        return self._special is not None

    # ---------------------------------------------------------------- before rendering

    def shield(self, value: Any) -> Any:
        """`value` (strings, lists, dicts: keys too) with special tokens' text swapped for sentinels."""
        if self._special is None:
            return value
        if isinstance(value, str):
            return self._special.sub(self._mark, value)
        if isinstance(value, dict):
            return {self.shield(k): self.shield(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.shield(v) for v in value)
        return value

    def _mark(self, match: re.Match[str]) -> str:
        return f"{self._open}{self._index[match.group(0)]}{self._close}"

    # ---------------------------------------------------------------- after rendering

    def text(self, rendered: str) -> str:
        """The render as the client's text reads: sentinels back to the special tokens' text."""
        if self._special is None:
            return rendered
        return self._sentinel.sub(lambda m: self._token(m) or m.group(0), rendered)

    def encode(self, rendered: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of a render: the template's markers special, the client's text never."""
        if self._special is None or self._open not in rendered:
            return list(self._tokenizer.encode(rendered, add_special_tokens=add_special_tokens))
        segments: list[tuple[str, bool]] = []
        pos = 0
        for m in self._sentinel.finditer(rendered):
            token = self._token(m)
            if token is not None:
                segments += [(rendered[pos : m.start()], False), (token, True)]
                pos = m.end()
        segments.append((rendered[pos:], False))
        return list(self._tokenizer.encode_segments(segments, add_special_tokens=add_special_tokens))

    def _token(self, match: re.Match[str]) -> str | None:
        i = int(match.group(1))
        return self._strings[i] if i < len(self._strings) else None
