"""The one text pipeline every chat-shaped route shares (Chat Completions, Responses, Messages).

  messages --render_prompt--> ChatPrompt (token ids + where thinking starts)
  tools / response format --grammar_factories--> logits processors (held back until thinking ends)
  engine tokens --generation.run_choices (detokenize, stop strings)--> text
  text --OutputParser--> ReasoningEvent / ContentEvent / ToolCallStartEvent / ToolArgumentsEvent

A route only maps those events to its wire format; it never looks at raw model text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from dashchat.engine.types import LogitsProcessorFactory
from dashchat.server.plumbing.errors import APIError, bad_request
from dashchat.server.text.reasoning import (
    ReasoningEvent,
    ReasoningFormat,
    ReasoningParser,
    ThinkStart,
    think_start,
)
from dashchat.server.state import ServerState
from dashchat.server.text.tool_parser import (
    ContentEvent,
    ParserEvent,
    ToolArgumentsEvent,
    ToolCall,
    ToolCallStartEvent,
    ToolCallStreamParser,
    collect,
)
from dashchat.server.text.tool_request import ToolPlan

log = logging.getLogger("dashchat.server")

OutputEvent = ReasoningEvent | ParserEvent

__all__ = [
    "Answer", "ChatPrompt", "ContentEvent", "OutputEvent", "OutputParser", "ReasoningEvent",
    "ToolArgumentsEvent", "ToolCallStartEvent", "collect_output", "grammar_factories", "render_prompt",
    "template_kwargs",
]


# ---------------------------------------------------------------- the prompt


@dataclass
class ChatPrompt:
    ids: list[int]
    text: str  # as the client's text reads
    reasoning: ReasoningFormat | None  # the model thinks in this format (None: not a thinking model)
    start: ThinkStart  # where its output starts (OFF when reasoning is None)
    marked: str = ""  # the render with the client's special-token text as sentinels (ContentGuard)

    @property
    def thinks(self) -> bool:
        """The output may (MAYBE) or does (INSIDE) start with thinking."""
        return self.reasoning is not None and self.start is not ThinkStart.OFF

    def output_parser(self, tools: list[dict[str, Any]] | None) -> OutputParser:
        return OutputParser(tools, self.reasoning, self.start)


def template_kwargs(state: ServerState, requested: dict[str, Any] | None, param: str = "chat_template_kwargs",
                    **route: Any) -> dict[str, Any]:
    """Server defaults (--default-chat-template-kwargs), then the route's own (e.g. Anthropic
    `thinking` -> enable_thinking), then the request's `chat_template_kwargs`: every key reaches the
    template, as in vLLM, except the ones the server itself sets."""
    kwargs = {**state.cfg.default_chat_template_kwargs, **route, **(requested or {})}
    reserved = {"messages", "tools", "add_generation_prompt"} & set(kwargs)
    if reserved:
        raise bad_request(f"'{param}' must not set {', '.join(sorted(reserved))}.", param)
    return kwargs


def render_prompt(state: ServerState, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
                  kwargs: dict[str, Any] | None = None, param: str = "messages",
                  add_generation_prompt: bool = True) -> ChatPrompt:
    """Messages in OpenAI's chat shape (assistant turns may carry `reasoning_content`) -> prompt.
    Blocking (template + tokenizer): call it with asyncio.to_thread."""
    from dashchat.server.text.chat_template import ChatTemplateError, render_chat_prompt

    guard = state.guard  # everything the client sent is shielded: its special-token text stays text
    try:
        marked = render_chat_prompt(state.tokenizer, guard.shield(messages), tools=guard.shield(tools) or None,
                                    chat_template=state.cfg.chat_template,
                                    add_generation_prompt=add_generation_prompt, **guard.shield(kwargs or {}))
    except ChatTemplateError as exc:
        raise bad_request(f"Could not apply the chat template: {exc}", param) from None
    text = guard.text(marked)
    fmt = state.reasoning
    start = think_start(fmt, text) if fmt is not None else ThinkStart.OFF
    return ChatPrompt(guard.encode(marked), text, fmt, start, marked)


# ---------------------------------------------------------------- grammars


def grammar_factories(state: ServerState, plan: ToolPlan, prompt: ChatPrompt, *, json_output: bool = False,
                      schema: dict[str, Any] | None = None, tools_param: str = "tools",
                      choice_param: str = "tool_choice", format_param: str = "response_format"
                      ) -> list[LogitsProcessorFactory]:
    """Logits processors for a request: a forced tool call (required / named), else a JSON answer
    (`json_output`, against `schema` when given), else `auto` tool calls constrained once they start.
    For a thinking model they start only once the thinking block is closed. The *_param names are
    the route's field names, for 400s."""
    factories = _answer_grammar(state, plan, json_output, schema, tools_param, choice_param, format_param)
    if factories and prompt.thinks:
        assert prompt.reasoning is not None
        backend = state.grammar(format_param if json_output else choice_param)
        factories = [backend.after_reasoning(f, prompt.reasoning, prompt.start) for f in factories]
    return factories


def _answer_grammar(state: ServerState, plan: ToolPlan, json_output: bool, schema: dict[str, Any] | None,
                    tools_param: str, choice_param: str, format_param: str) -> list[LogitsProcessorFactory]:
    if plan.parse and plan.forced:
        try:
            return [state.grammar(choice_param).tool_calls(plan.forced_tools(), plan.parallel)]
        except ValueError as exc:
            raise bad_request(str(exc), tools_param) from None
    if json_output:  # a JSON answer wins over auto tool calls: the answer is that JSON
        try:
            return [state.grammar(format_param).json_schema(schema)]
        except ValueError as exc:
            raise bad_request(f"Invalid '{format_param}': {exc}", format_param) from None
    if not (plan.parse and plan.mode == "auto"):
        return []
    # auto: free text, but once the model starts a call the rest is a valid call (grammar.py).
    # Without a grammar engine, auto still works by parsing alone.
    if not getattr(state.engine, "supports_logits_processors", True):  # e.g. DashInfer: no per-token hook
        return []
    try:
        return [state.grammar("tools").triggered_tool_calls(plan.tools, plan.parallel)]
    except (APIError, ValueError) as exc:
        log.debug("auto tool calls unconstrained: %s", exc)
        return []


# ---------------------------------------------------------------- the output


class OutputParser:
    """One choice's text -> events: its thinking (ReasoningEvent, always first), then the answer as
    content and tool calls (tool_parser's events). No reasoning text ever reaches content or a
    call: calls are parsed from the answer only.

    `tools`: parse calls of these (None/[]: all answer text is content, passed through as it comes).
    """

    def __init__(self, tools: list[dict[str, Any]] | None, reasoning: ReasoningFormat | None = None,
                 start: ThinkStart = ThinkStart.OFF) -> None:
        self._reasoning: ReasoningParser | None = None
        if reasoning is not None and start is not ThinkStart.OFF:
            self._reasoning = ReasoningParser(reasoning, start)
        self._tools = ToolCallStreamParser(tools) if tools else None
        self.called = False  # a tool call was announced
        self.reasoning_tokens = 0  # tokens written inside the thinking block, markers included
        self._undecided = 0  # tokens of what may still open a block (a `<think>` spelled in pieces)

    @property
    def cut_call(self) -> bool:
        """finish(length=True) dropped a call the model was writing (see ToolCallStreamParser)."""
        return self._tools is not None and self._tools.cut_call

    def feed(self, text: str, tokens: int = 0) -> list[OutputEvent]:
        """`text`: new output text; `tokens`: how many tokens wrote it (for reasoning_tokens)."""
        if self._reasoning is None:
            return self._answer(text)
        reasoning, answer = self._reasoning.feed(text)
        if self._reasoning.touched:
            self.reasoning_tokens += tokens + self._undecided
            self._undecided = 0
        elif self._reasoning.undecided:
            self._undecided += tokens
        else:
            self._undecided = 0
        return self._events(reasoning, answer)

    def finish(self, length: bool = False) -> list[OutputEvent]:
        """End of output; `length`: cut by max_tokens (an unfinished call is dropped, not content)."""
        events: list[OutputEvent] = []
        if self._reasoning is not None:
            events = self._events(*self._reasoning.finish())
        if self._tools is not None:
            events += self._note(self._tools.finish(length=length))
        return events

    def _events(self, reasoning: str, answer: str) -> list[OutputEvent]:
        events: list[OutputEvent] = [ReasoningEvent(reasoning)] if reasoning else []
        return events + self._answer(answer) if answer else events

    def _answer(self, text: str) -> list[OutputEvent]:
        if self._tools is None:
            return [ContentEvent(text)] if text else []
        return self._note(self._tools.feed(text))

    def _note(self, events: list[ParserEvent]) -> list[OutputEvent]:
        self.called = self.called or any(isinstance(e, ToolCallStartEvent) for e in events)
        return [e for e in events if not (isinstance(e, ContentEvent) and not e.text)]


@dataclass
class Answer:
    reasoning: str | None = None
    content: str | None = None
    calls: list[ToolCall] = field(default_factory=list)


def collect_output(events: list[OutputEvent]) -> Answer:
    """A whole output's events -> its reasoning, content and calls (None when empty)."""
    reasoning = "".join(ev.text for ev in events if isinstance(ev, ReasoningEvent))
    content, calls = collect([ev for ev in events if not isinstance(ev, ReasoningEvent)])
    return Answer(reasoning or None, content, calls)
