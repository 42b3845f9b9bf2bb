"""Reasoning models: split the thinking (`<think>…</think>`) from the answer, streamed or whole.

Qwen3, QwQ and DeepSeek-R1 style models write their thinking first, between `<think>` and
`</think>`, then the answer. Whether a request thinks, and where the thinking starts, is read off
the rendered prompt (`ThinkStart`):
  - the prompt ends with `<think>` (DeepSeek-R1, Qwen3-Thinking-2507): the output starts inside the
    thinking, and the model only writes the closing `</think>`;
  - the prompt ends with `</think>` (Qwen3 with `enable_thinking: false` renders an empty block):
    no thinking, the output is all answer;
  - otherwise (Qwen3 by default): the model may open a block as its first output; anything else
    first means it does not think this time.

`ReasoningParser` is one streaming state machine; every decision it makes is one later text
cannot change, so any split of the text gives the same reasoning and answer (tests split at every
point). Only a leading block is reasoning: a `<think>` later in the answer is answer text. An
unterminated block (cut by max_tokens, or the model stopped) stays reasoning, never answer.
Whitespace around the markers is markup: the reasoning is stripped at both ends, the answer at
its start.

The markers must survive detokenizing: they do for Qwen3 and DeepSeek-R1 (`<think>` is an added
token but not a special one).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningFormat:
    """How one family of models marks its thinking."""

    name: str
    open: str = THINK_OPEN
    close: str = THINK_CLOSE


# Names as vLLM spells them, so `--reasoning-parser` flags carry over; all of these use <think>.
FORMATS: dict[str, ReasoningFormat] = {
    name: ReasoningFormat(name) for name in ("qwen3", "deepseek_r1", "think")
}


class ThinkStart(Enum):
    MAYBE = "maybe"  # the model may open a block as its first output
    INSIDE = "inside"  # the prompt opened the block: the output starts as reasoning
    OFF = "off"  # the prompt closed the block (or thinking is off): the output is all answer


def choose_format(name: str | None, chat_template: str | None) -> ReasoningFormat | None:
    """`--reasoning-parser`: a format name, "none", or None (auto: a template that writes or reads
    `<think>` blocks, or knows `reasoning_content`, belongs to a thinking model)."""
    if name is not None:
        if name == "none":
            return None
        if name not in FORMATS:
            raise ValueError(f"unknown reasoning parser {name!r}; choose one of: none, {', '.join(FORMATS)}")
        return FORMATS[name]
    if chat_template and (THINK_CLOSE in chat_template or "reasoning_content" in chat_template):
        return FORMATS["think"]
    return None


def think_start(fmt: ReasoningFormat, prompt: str) -> ThinkStart:
    """Where the output starts, from the end of the rendered prompt."""
    tail = prompt.rstrip()
    if tail.endswith(fmt.open):
        return ThinkStart.INSIDE
    if tail.endswith(fmt.close):
        return ThinkStart.OFF
    return ThinkStart.MAYBE


@dataclass
class ReasoningEvent:
    """A piece of the model's thinking (streamed before any answer text)."""

    text: str


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ReasoningParser:
    """Feed detokenized text; get (reasoning, answer) deltas. The reasoning of one output always
    comes before its answer, so each feed returns at most one of each, in that order."""

    def __init__(self, fmt: ReasoningFormat, start: ThinkStart = ThinkStart.MAYBE) -> None:
        self.fmt = fmt
        # start: before the first non-whitespace output; think: inside the block;
        # answer_start: after the block, leading whitespace dropped; answer: pass-through
        self._mode = {ThinkStart.MAYBE: "start", ThinkStart.INSIDE: "think", ThinkStart.OFF: "answer"}[start]
        self._buf = ""
        self._lead = True  # no reasoning text emitted yet (leading whitespace is markup)
        self._ws = ""  # trailing whitespace of the reasoning, held until more reasoning follows
        self.touched = False  # the last feed/finish read text inside the block (for token counting)

    @property
    def thinking(self) -> bool:
        """Inside the block: what the model writes now is reasoning."""
        return self._mode == "think"

    @property
    def undecided(self) -> bool:
        """Nothing but whitespace or a piece of the opener yet: may still become a block."""
        return self._mode == "start"

    @property
    def done(self) -> bool:
        """The answer has begun (the block closed, or the model did not open one)."""
        return self._mode in ("answer_start", "answer")

    def feed(self, text: str) -> tuple[str, str]:
        self.touched = self._mode == "think"
        self._buf += text
        return self._run(final=False)

    def finish(self) -> tuple[str, str]:
        """End of output: an unterminated block stays reasoning (its trailing whitespace dropped)."""
        self.touched = self._mode == "think"
        reasoning, answer = self._run(final=True)
        self._ws = ""
        return reasoning, answer

    # -- the state machine ---------------------------------------------------------
    def _run(self, final: bool) -> tuple[str, str]:
        reasoning: list[str] = []
        answer: list[str] = []
        while True:
            mode, size = self._mode, len(self._buf)
            getattr(self, "_step_" + self._mode)(final, reasoning, answer)
            if (self._mode, len(self._buf)) == (mode, size):
                return "".join(reasoning), "".join(answer)

    def _step_start(self, final: bool, reasoning: list[str], answer: list[str]) -> None:
        s = self._buf.lstrip()
        opener = self.fmt.open
        if s.startswith(opener):
            self._buf = s[len(opener):]
            self._mode = "think"
            self.touched = True
        elif not s and not final:
            return  # only whitespace so far
        elif opener.startswith(s) and s and not final:
            return  # may be the start of the opener
        else:
            self._mode = "answer"  # the model did not think: all of it is answer

    def _step_think(self, final: bool, reasoning: list[str], answer: list[str]) -> None:
        closer = self.fmt.close
        i = self._buf.find(closer)
        if i >= 0:
            self._reason(self._buf[:i], reasoning)
            self._ws = ""
            self._buf = self._buf[i + len(closer):]
            self._mode = "answer_start"
            return
        keep = 0 if final else _partial_suffix(self._buf, closer)
        self._reason(self._buf[: len(self._buf) - keep], reasoning)
        self._buf = self._buf[len(self._buf) - keep:]

    def _reason(self, text: str, out: list[str]) -> None:
        if self._lead:
            text = text.lstrip()
            if not text:
                return
            self._lead = False
        full = self._ws + text
        body = full.rstrip()
        self._ws = full[len(body):]
        if body:
            out.append(body)

    def _step_answer_start(self, final: bool, reasoning: list[str], answer: list[str]) -> None:
        s = self._buf.lstrip()
        self._buf = s
        if s:
            self._mode = "answer"

    def _step_answer(self, final: bool, reasoning: list[str], answer: list[str]) -> None:
        if self._buf:
            answer.append(self._buf)
            self._buf = ""


def split_reasoning(text: str, fmt: ReasoningFormat, start: ThinkStart = ThinkStart.MAYBE) -> tuple[str, str]:
    """(reasoning, answer) of a whole output; the same decisions as the streaming parser."""
    parser = ReasoningParser(fmt, start)
    r1, a1 = parser.feed(text)
    r2, a2 = parser.finish()
    return r1 + r2, a1 + a2


def template_reads_reasoning(chat_template: str) -> bool:
    """Whether the template renders `reasoning_content` of assistant turns (Qwen3 does)."""
    return "reasoning_content" in chat_template


def assistant_reasoning(message: dict[str, Any]) -> str | None:
    """The reasoning a client sent back on an assistant turn (`reasoning_content` or `reasoning`)."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str):
            return value
    return None
