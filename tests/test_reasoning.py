"""Reasoning models: the <think> split (whole and at every streaming split point), the text pipeline
with tool calls after the thinking, Qwen3's real chat template (enable_thinking, reasoning_content
sent back), and grammars that start only once the thinking is closed (real xgrammar)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_helpers import text_pieces
from tiny_qwen3 import IDS, QWEN3_TEMPLATE, THINK_CLOSE, THINK_OPEN, TOOL_CALL_OPEN, write_tokenizer

from dashchat.server.text.chat_template import render_chat_prompt
from dashchat.server.text.reasoning import (
    FORMATS,
    ReasoningParser,
    ThinkStart,
    choose_format,
    split_reasoning,
    think_start,
)
from dashchat.server.text.pipeline import (
    ContentEvent,
    OutputParser,
    ReasoningEvent,
    ToolArgumentsEvent,
    ToolCallStartEvent,
    collect_output,
)

QWEN3 = FORMATS["qwen3"]
MAYBE, INSIDE, OFF = ThinkStart.MAYBE, ThinkStart.INSIDE, ThinkStart.OFF

# (output, where it starts, reasoning, answer)
CASES = [
    ("<think>\nLet me think.\n</think>\n\nThe answer is 4.", MAYBE, "Let me think.", "The answer is 4."),
    ("The answer is 4.", MAYBE, "", "The answer is 4."),  # the model did not think
    ("\n\n<think>a\n\nb</think>c", MAYBE, "a\n\nb", "c"),
    ("<think></think>\n\nanswer", MAYBE, "", "answer"),
    ("<think>\n\n</think>\n\n", MAYBE, "", ""),
    ("<think>\nstill thinking when cut  ", MAYBE, "still thinking when cut", ""),  # unterminated: reasoning
    ("<thi", MAYBE, "", "<thi"),  # ended on a piece of the opener: answer text
    ("<thinking>x", MAYBE, "", "<thinking>x"),
    ("Answer <think>not thinking</think> at all", MAYBE, "", "Answer <think>not thinking</think> at all"),
    ("2 < 3 </think>", MAYBE, "", "2 < 3 </think>"),
    ("from the prompt's <think>\n</think>\n\nanswer", INSIDE, "from the prompt's <think>", "answer"),
    ("no closer at all", INSIDE, "no closer at all", ""),
    ("x </thin", INSIDE, "x </thin", ""),  # a piece of the closer at the end stays reasoning
    ("a</think>b</think>c", INSIDE, "a", "b</think>c"),
    ("<think>off</think>answer", OFF, "", "<think>off</think>answer"),
    ("思考 😀\n</think>\n答案", INSIDE, "思考 😀", "答案"),
]


def _stream(parser: ReasoningParser, text: str, cuts: list[int]) -> list[tuple[str, str]]:
    return [parser.feed(piece) for piece in text_pieces(text, cuts)] + [parser.finish()]


@pytest.mark.parametrize("text,start,reasoning,answer", CASES)
def test_split_whole(text: str, start: ThinkStart, reasoning: str, answer: str) -> None:
    assert split_reasoning(text, QWEN3, start) == (reasoning, answer)


@settings(max_examples=400, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=80), max_size=30))
def test_split_at_any_streaming_point(case: tuple, cuts: list[int]) -> None:
    text, start, reasoning, answer = case
    pieces = _stream(ReasoningParser(QWEN3, start), text, cuts)
    assert "".join(r for r, _ in pieces) == reasoning
    assert "".join(a for _, a in pieces) == answer
    # All reasoning is streamed before any answer text.
    first_answer = next((i for i, (_, a) in enumerate(pieces) if a), len(pieces))
    assert not any(r for r, _ in pieces[first_answer + 1:])


@pytest.mark.parametrize("text,start,reasoning,answer", CASES)
def test_split_char_by_char(text: str, start: ThinkStart, reasoning: str, answer: str) -> None:
    pieces = _stream(ReasoningParser(QWEN3, start), text, list(range(len(text))))
    assert ("".join(r for r, _ in pieces), "".join(a for _, a in pieces)) == (reasoning, answer)


def test_format_detected_from_the_template_or_named() -> None:
    assert choose_format(None, QWEN3_TEMPLATE) is FORMATS["think"]
    assert choose_format(None, "{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert choose_format("none", QWEN3_TEMPLATE) is None
    assert choose_format("deepseek_r1", None) is FORMATS["deepseek_r1"]
    with pytest.raises(ValueError):
        choose_format("nonsense", None)


# ---------------------------------------------------------------- the template


class _Tok:
    bos_token, eos_token, chat_template = None, "<|im_end|>", QWEN3_TEMPLATE


USER = [{"role": "user", "content": "What is 2+2?"}]


def test_enable_thinking_reaches_the_template() -> None:
    on = render_chat_prompt(_Tok(), USER)
    off = render_chat_prompt(_Tok(), USER, enable_thinking=False)
    assert on.endswith("<|im_start|>assistant\n")
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert think_start(QWEN3, on) is MAYBE and think_start(QWEN3, off) is OFF
    assert think_start(QWEN3, "<|im_start|>assistant\n<think>\n") is INSIDE


@pytest.mark.parametrize("key", ["reasoning_content", "reasoning"])
def test_reasoning_sent_back_is_rendered_as_the_template_expects(key: str) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}
    messages = [*USER, {"role": "assistant", "content": "", key: "I should add.", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "4"}]
    prompt = render_chat_prompt(_Tok(), messages)
    # Qwen3 shows the thinking of turns after the last user query, inside <think>.
    assert ("<|im_start|>assistant\n<think>\nI should add.\n</think>\n\n<tool_call>\n"
            '{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>') in prompt
    # A template that does not know reasoning_content never sees it (nor `reasoning`).
    plain = render_chat_prompt(_Tok(), messages, chat_template="{{ messages | tojson }}")
    assert "I should add." not in plain and "reasoning" not in plain


# ---------------------------------------------------------------- the pipeline with tools

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

PIPELINE_CASES = [
    # (output, start, reasoning, content, calls)
    (f"<think>\nMaybe {CALL} would help.\n</think>\n\n{CALL}", MAYBE,
     f"Maybe {CALL} would help.", None, [("get_weather", '{"city": "Paris"}')]),
    (f"<think>I will answer directly.</think>\n\nIt is sunny. {CALL}", MAYBE,
     "I will answer directly.", "It is sunny.", [("get_weather", '{"city": "Paris"}')]),
    (f"<think>\n{CALL}", MAYBE, CALL, None, []),  # cut inside the thinking: no call, no content
    ('{"name": "get_weather", "arguments": {"city": "Rome"}}', MAYBE, None, None,
     [("get_weather", '{"city": "Rome"}')]),  # no thinking: bare JSON call at the start
    ("reasoning</think>\n\n" + CALL, INSIDE, "reasoning", None, [("get_weather", '{"city": "Paris"}')]),
    ("plain answer", OFF, None, "plain answer", []),
]


def _pipeline(text: str, start: ThinkStart, cuts: list[int]) -> list:
    parser = OutputParser(TOOLS, QWEN3, start)
    return [event for piece in text_pieces(text, cuts) for event in parser.feed(piece)] + parser.finish()


def _check(events: list, reasoning: str | None, content: str | None, calls: list) -> None:
    answer = collect_output(events)
    assert answer.reasoning == reasoning
    assert answer.content == content
    assert [(c.name, c.arguments) for c in answer.calls] == calls
    kinds = [type(e) for e in events]
    if ReasoningEvent in kinds:  # thinking first, never interleaved with the answer
        last = max(i for i, k in enumerate(kinds) if k is ReasoningEvent)
        assert all(k is ReasoningEvent for k in kinds[: last + 1])
    assert all(isinstance(e, (ReasoningEvent, ContentEvent, ToolCallStartEvent, ToolArgumentsEvent)) for e in events)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(PIPELINE_CASES), cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=40))
def test_pipeline_at_any_split(case: tuple, cuts: list[int]) -> None:
    text, start, reasoning, content, calls = case
    _check(_pipeline(text, start, cuts), reasoning, content, calls)


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_char_by_char(case: tuple) -> None:
    text, start, reasoning, content, calls = case
    _check(_pipeline(text, start, list(range(len(text)))), reasoning, content, calls)


def test_reasoning_tokens_count_the_block_and_its_markers() -> None:
    parser = OutputParser(None, QWEN3, MAYBE)
    for piece in ["<", "think", ">", "\nhm", "m\n", "</think>", "\n\nHi", "!"]:  # one token each
        parser.feed(piece, 1)
    parser.finish()
    assert parser.reasoning_tokens == 6


# ---------------------------------------------------------------- grammars after the thinking

xgrammar = pytest.importorskip("xgrammar")


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from dashchat.server.text.grammar import GrammarBackend
    from dashchat.tokenizer import Tokenizer

    path: Path = tmp_path_factory.mktemp("qwen3-tok")
    write_tokenizer(path)
    tok = Tokenizer.from_dir(path)
    return GrammarBackend(tok, tok.vocab_size)


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


def _allowed(processor, output: list[int], vocab: int) -> set[int]:  # type: ignore[no-untyped-def]
    row = processor(list(output), torch.zeros(vocab))
    return {i for i in range(vocab) if torch.isfinite(row[i])}


def _bytes(text: str) -> list[int]:
    return list(text.encode())


def test_json_schema_starts_after_the_closer(backend) -> None:  # type: ignore[no-untyped-def]
    vocab = backend.vocab_size
    proc = backend.after_reasoning(backend.json_schema(SCHEMA), QWEN3, MAYBE)()
    # First token: the opener, or what the grammar allows first.
    assert _allowed(proc, [], vocab) == {THINK_OPEN, ord("{")}
    out = [THINK_OPEN] + _bytes("\nI think {not json} here")
    assert len(_allowed(proc, out, vocab)) == vocab  # thinking: unconstrained
    out += [THINK_CLOSE]
    assert _allowed(proc, out, vocab) == {ord("{")}
    out += _bytes('{"ok": ')
    assert _allowed(proc, out, vocab) == {ord("t"), ord("f")}


def test_forced_tool_call_after_thinking_and_closer_in_pieces(backend) -> None:  # type: ignore[no-untyped-def]
    vocab = backend.vocab_size
    proc = backend.after_reasoning(backend.tool_calls(TOOLS, parallel=False), QWEN3, INSIDE)()
    out = _bytes("thinking about <tool_call> calls")
    assert len(_allowed(proc, out, vocab)) == vocab
    out += _bytes("</thi") + _bytes("nk>")  # the closer spelled in byte tokens
    allowed = _allowed(proc, out, vocab)
    assert TOOL_CALL_OPEN in allowed and ord("a") not in allowed and THINK_OPEN not in allowed


def test_no_thinking_means_the_grammar_from_the_first_token(backend) -> None:  # type: ignore[no-untyped-def]
    vocab = backend.vocab_size
    proc = backend.after_reasoning(backend.json_schema(SCHEMA), QWEN3, MAYBE)()
    assert THINK_OPEN in _allowed(proc, [], vocab)
    assert _allowed(proc, [ord("{")], vocab) == {ord('"')}  # the model chose to answer: constrained at once
    assert IDS["</think>"] not in _allowed(proc, _bytes('{"'), vocab)


def test_answer_text_after_the_block_is_parsed_from_what_the_grammar_wrote() -> None:
    # The grammar's output after </think> goes through the same pipeline: JSON content, no leak.
    text = '<think>\nThe user wants JSON.\n</think>{"ok": true}'
    answer = collect_output(_pipeline(text, MAYBE, []))
    assert answer.reasoning == "The user wants JSON."
    assert json.loads(answer.content or "") == {"ok": True}
