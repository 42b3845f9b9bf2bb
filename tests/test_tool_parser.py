"""Tool-call parsing, whole and streamed, on what models really emit."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from stream_helpers import text_pieces

from dashchat.server.text.tool_parser import (
    ContentEvent,
    ToolArgumentsEvent,
    ToolCallStartEvent,
    ToolCallStreamParser,
    parse_tool_calls,
)


def _tool(name: str, **props: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": name,
            "parameters": {"type": "object", "properties": {k: {"type": v} for k, v in props.items()}},
        },
    }


TOOLS = [
    _tool("get_weather", city="string", unit="string"),
    _tool("search_web", query="string", max_results="integer"),
    _tool("translate", text="string", target_lang="string"),
]

# (model output, expected content, expected [(name, arguments)]).
# The first block is verbatim output of Qwen2.5-Coder-0.5B-Instruct (GGUF Q4, its own chat template
# with tools), greedy and sampled; the rest follow the published formats of other model families.
CASES: list[tuple[str, str | None, list[tuple[str, str]]]] = [
    (
        '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}',
        None,
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        '```json\n{\n  "name": "get_weather",\n  "arguments": {\n    "city": "北京",\n    "unit": "celsius"\n  }\n}\n```',
        None,
        [("get_weather", '{"city": "北京", "unit": "celsius"}')],
    ),
    (
        ('```json\n{\n  "name": "search_web",\n  "arguments": {\n    "query": "PyTorch release notes",\n'
        '    "max_results": 10\n  }\n}\n```'),
        None,
        [("search_web", '{"query": "PyTorch release notes", "max_results": 10}')],
    ),
    (
        '{"name": "translate", "arguments": {"text": "today天气很好", "target_lang": "en"}}',
        None,
        [("translate", '{"text": "today天气很好", "target_lang": "en"}')],
    ),
    # Not an offered tool (and unbalanced): stays content, verbatim.
    (
        '{"name": "cat joke", "arguments": {"cat": "Meow"}',
        '{"name": "cat joke", "arguments": {"cat": "Meow"}',
        [],
    ),
    (
        '{"name": "Cat Joke", "arguments": {"cat": "Meow", "cat-smile": "Meow, meow, meow!"}}',
        '{"name": "Cat Joke", "arguments": {"cat": "Meow", "cat-smile": "Meow, meow, meow!"}}',
        [],
    ),
    # Hermes / Qwen2.5-Instruct: several calls, text before.
    (
        ("Let me check both cities.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "東京", "unit": "celsius"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Berlin", "unit": "celsius"}}\n</tool_call>'),
        "Let me check both cities.",
        [("get_weather", '{"city": "東京", "unit": "celsius"}'), ("get_weather", '{"city": "Berlin", "unit": "celsius"}')],
    ),
    # Hermes, stopped by EOS before the close tag; \u escapes canonicalized.
    (
        '<tool_call>\n{"name": "translate", "arguments": {"text": "\\u4eca\\u5929", "target_lang": "English"}}',
        None,
        [("translate", '{"text": "今天", "target_lang": "English"}')],
    ),
    # Llama 3.x: JSON with "parameters", after <|python_tag|> or bare; several joined by ';'.
    (
        '<|python_tag|>{"name": "search_web", "parameters": {"query": "上海 天气"}}',
        None,
        [("search_web", '{"query": "上海 天气"}')],
    ),
    (
        '{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "search_web", "parameters": {"query": "fjords"}}',
        None,
        [("get_weather", '{"city": "Oslo"}'), ("search_web", '{"query": "fjords"}')],
    ),
    # Mistral.
    (
        ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "search_web", "arguments": {"query": "colosseum", "max_results": 3}}]'),
        None,
        [("get_weather", '{"city": "Rome"}'), ("search_web", '{"query": "colosseum", "max_results": 3}')],
    ),
    # Phi-4-mini: `functools` then one JSON array, no closing marker; the word alone is no marker.
    (
        ('functools[{"name": "get_weather", "arguments": {"city": "Rome"}}, '
        '{"name": "search_web", "arguments": {"query": "colosseum", "max_results": 3}}]'),
        None,
        [("get_weather", '{"city": "Rome"}'), ("search_web", '{"query": "colosseum", "max_results": 3}')],
    ),
    (
        'I will translate it. functools[{"name": "translate", "arguments": {"text": "hi", "target_lang": "fr"}}]',
        "I will translate it.",
        [("translate", '{"text": "hi", "target_lang": "fr"}')],
    ),
    (
        "import functools\nx = functools[0] or functools.partial(f)\nfunctools[{\"a\": 1}] functools",
        "import functools\nx = functools[0] or functools.partial(f)\nfunctools[{\"a\": 1}] functools",
        [],
    ),
    # Double-encoded arguments, pretty JSON, text after the call.
    (
        '\n{"name": "get_weather",\n "arguments": "{\\"city\\": \\"Nice\\"}"}\n\nI asked for the weather.',
        "I asked for the weather.",
        [("get_weather", '{"city": "Nice"}')],
    ),
    # OpenAI-shaped object inside a fence without language.
    (
        'Calling:\n```\n{"type": "function", "function": {"name": "search_web", "arguments": {"query": "q"}}}\n```',
        "Calling:",
        [("search_web", '{"query": "q"}')],
    ),
    # SmolLM2-135M-Instruct (GGUF Q4_1, built-in tool prompt) rarely calls: its real answers stay content.
    (
        "在<tool_response></tool_response> XML tags中，显示的是一个json-string",
        "在<tool_response></tool_response> XML tags中，显示的是一个json-string",
        [],
    ),
    (
        '沉七风！\n\n返回文案：\n\n```json\n{\n  "user": {\n    "id": "123456",\n    "user_id": "12345",\n    "goal_score": "',
        '沉七风！\n\n返回文案：\n\n```json\n{\n  "user": {\n    "id": "123456",\n    "user_id": "12345",\n    "goal_score": "',
        [],
    ),
    (
        ("To search for the latest PyTorch release notes, you can use the following code:\n\n```python\n"
        'import requests\n\ndef search_pytorch_notes():\n    url = "https://pytorch.org/docs/stable/latest.html"\n'
        "    response = requests.get(url)\n    return response.json()\n"),
        ("To search for the latest PyTorch release notes, you can use the following code:\n\n```python\n"
        'import requests\n\ndef search_pytorch_notes():\n    url = "https://pytorch.org/docs/stable/latest.html"\n'
        "    response = requests.get(url)\n    return response.json()\n"),
        [],
    ),
    # Qwen3-Coder / GLM XML: parameters typed by the tool's schema (max_results is an integer),
    # strings verbatim (markup-like text inside is kept), several calls, text before.
    (
        '<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n<parameter=unit>\n'
        'celsius\n</parameter>\n</function>\n</tool_call>',
        None,
        [("get_weather", '{"city": "Paris", "unit": "celsius"}')],
    ),
    (
        'Let me search.\n<tool_call>\n<function=search_web>\n<parameter=query>\nbest <b>pizza</b> 東京\n'
        '</parameter>\n<parameter=max_results>\n5\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n'
        '<function=translate>\n<parameter=text>\n{"not": "json"}\n</parameter>\n</function>\n</tool_call>',
        "Let me search.",
        [("search_web", '{"query": "best <b>pizza</b> 東京", "max_results": 5}'),
         ("translate", '{"text": "{\\"not\\": \\"json\\"}"}')],
    ),
    # XML stopped by EOS before its end tags: what is there is the call.
    (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n",
        None,
        [("get_weather", '{"city": "Oslo"}')],
    ),
    # XML naming no offered tool: content (the <tool_call> tags swallowed, as for JSON).
    (
        "<tool_call>\n<function=launch>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call> ok",
        "<function=launch>\n<parameter=x>\n1\n</parameter>\n</function>\n ok",
        [],
    ),
    # DeepSeek V3 / R1 (type, separator, name, fenced JSON) and V3.1 (name, separator, JSON).
    (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n'
        '```<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>search_web\n```json\n'
        '{"query": "x", "max_results": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        None,
        [("get_weather", '{"city": "Paris"}'), ("search_web", '{"query": "x", "max_results": 2}')],
    ),
    (
        'Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Rome"}<｜tool▁call▁end｜>'
        "<｜tool▁calls▁end｜>",
        "Sure.",
        [("get_weather", '{"city": "Rome"}')],
    ),
    (
        '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>nope<｜tool▁sep｜>{"a": 1}<｜tool▁call▁end｜><｜tool▁calls▁end｜>',
        '<｜tool▁call▁begin｜>nope<｜tool▁sep｜>{"a": 1}<｜tool▁call▁end｜>',
        [],
    ),
    # Plain answers: nothing is a call, text is untouched.
    ("The weather in Paris is sunny, 25°C.", "The weather in Paris is sunny, 25°C.", []),
    (
        'Use this:\n```python\nprint("<tool_call>")\nx = {"name": "get_weather", "arguments": {}}\n```\nDone.\n',
        'Use this:\n```python\nprint("<tool_call>")\nx = {"name": "get_weather", "arguments": {}}\n```\nDone.\n',
        [],
    ),
    ('{"answer": 42, "unit": "°C"}', '{"answer": 42, "unit": "°C"}', []),
    ('```json\n{"city": "Paris"}\n```', '```json\n{"city": "Paris"}\n```', []),
    ("[1, 2, 3] are numbers; a < b and `x` [y]", "[1, 2, 3] are numbers; a < b and `x` [y]", []),
    ("  \n", "  \n", []),
    ("", None, []),
]

_MARKUP = ("<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<｜tool▁calls▁begin｜>", "functools[")


def _stream(text: str, cuts: list[int]) -> list:
    parser = ToolCallStreamParser(TOOLS)
    return [event for piece in text_pieces(text, cuts) for event in parser.feed(piece)] + parser.finish()


def _summary(events: list) -> tuple[str | None, list[tuple[str, str]]]:
    content = "".join(e.text for e in events if isinstance(e, ContentEvent))
    calls: list[list[str]] = []
    for e in events:
        if isinstance(e, ToolCallStartEvent):
            assert e.index == len(calls)
            assert re.fullmatch(r"call_[A-Za-z0-9]{24}", e.id)
            calls.append([e.name, ""])
        elif isinstance(e, ToolArgumentsEvent):
            assert e.index == len(calls) - 1  # fragments follow their start, in order
            calls[e.index][1] += e.fragment
    return (content or None), [(n, a) for n, a in calls]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_parse(text: str, content: str | None, calls: list[tuple[str, str]]) -> None:
    got_content, got_calls = parse_tool_calls(text, TOOLS)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls
    for c in got_calls:
        assert json.loads(c.arguments) is not None
    assert len({c.id for c in got_calls}) == len(got_calls)
    if got_calls and got_content:
        assert not any(m in got_content for m in _MARKUP)


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=40))
def test_stream_matches_whole_parse_at_any_split(case: tuple, cuts: list[int]) -> None:
    text = case[0]
    content, calls = parse_tool_calls(text, TOOLS)
    assert _summary(_stream(text, cuts)) == (content, [(c.name, c.arguments) for c in calls])


@settings(max_examples=100, deadline=None)
@given(case=st.sampled_from(CASES))
def test_stream_char_by_char(case: tuple) -> None:
    text, content, calls = case
    assert _summary(_stream(text, list(range(len(text))))) == (content, calls)


def test_plain_text_streams_without_delay() -> None:
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("Hello") == [ContentEvent("Hello")]
    assert parser.feed(" wor") == [ContentEvent(" wor")]
    assert parser.feed("ld <") == [ContentEvent("ld")]  # " <" may open <tool_call>
    assert parser.feed("b") == [ContentEvent(" <b")]
    assert parser.feed("``") == []
    assert parser.feed("`python\n") == [ContentEvent("```python")]  # code fence: content at once
    assert parser.finish() == [ContentEvent("\n")]


def test_json_answer_released_at_its_first_key() -> None:
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed('{"ans') == []
    assert parser.feed('wer": 1') == [ContentEvent('{"answer": 1')]


def test_call_announced_when_complete_and_tags_swallowed() -> None:
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed("<tool_call>\n") == []
    assert parser.feed('{"name": "get_weather", "arguments": {"city": "P') == []
    events = parser.feed('aris"}}\n</tool_')
    assert isinstance(events[0], ToolCallStartEvent) and events[0].name == "get_weather"
    assert events[1] == ToolArgumentsEvent(0, '{"city": "Paris"}')
    assert parser.feed("call>") == []
    assert parser.finish() == []


def test_unfinished_call_is_released_as_content() -> None:
    content, calls = parse_tool_calls('<tool_call>\n{"name": "get_weather", "arguments": {"ci', TOOLS)
    assert calls == []
    assert content == '{"name": "get_weather", "arguments": {"ci'


def test_no_tools_means_no_calls() -> None:
    text = '{"name": "get_weather", "arguments": {}}'
    assert parse_tool_calls(text, []) == (text, [])


def test_json_answer_with_a_name_is_released_at_the_name() -> None:
    """A first key "name" whose value is no offered tool's name: plain JSON, streamed at once."""
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed('{"name": "get') == []  # may still be get_weather
    assert parser.feed("ter") == [ContentEvent('{"name": "getter')]
    assert parser.feed('", "age": 3}') == [ContentEvent('", "age": 3}')]
    parser = ToolCallStreamParser(TOOLS)
    assert parser.feed('```json\n{\n  "name": "Alice",') == [ContentEvent('```json\n{\n  "name": "Alice",')]


@pytest.mark.parametrize(
    "text,region,body",
    [
        ("Sure.\n<tool_call>", "tag", ""),
        ("<tool_call>\n{", "tag", "\n{"),
        ('```json\n{\n  "name": "get', "fence", '{\n  "name": "get'),
        ('  {"name": "search_web"', "bare", '{"name": "search_web"'),
        ('[{ "name" : "tr', "bare", '[{ "name" : "tr'),
        ('[TOOL_CALLS][{"name": "g', "line", '[{"name": "g'),
        ('Ok. functools[{"name": "tr', "line", '[{"name": "tr'),
        ("<tool_call>\n<function=get_", "tag", "\n<function=get_"),
        ("Ok.<｜tool▁calls▁begin｜>", "deepseek", ""),
    ],
)
def test_open_call_marks_where_a_call_begins(text: str, region: str, body: str) -> None:
    for cuts in ([], list(range(len(text)))):  # whole, and one character at a time
        parser = ToolCallStreamParser(TOOLS)
        for piece in text_pieces(text, cuts):
            parser.feed(piece)
        hit = parser.open_call()
        assert hit is not None and hit[0] == region and text[hit[1]:].lstrip("\n") == body.lstrip("\n")
        assert parser.region == region


@pytest.mark.parametrize(
    "text",
    ['{"name": "Alice"', '{"title": "x"', '```json\n{"name": "x', "<b>", '```python\n{"name": "get', "[1, 2"],
)
def test_open_call_is_none_for_other_text(text: str) -> None:
    parser = ToolCallStreamParser(TOOLS)
    parser.feed(text)
    assert parser.open_call() is None


# (text cut by max_tokens, content, calls, a call was cut off)
CUT_CASES: list[tuple[str, str | None, list[str], bool]] = [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"ci', None, [], True),
    ("Checking.\n<tool_call>\n", "Checking.", [], True),
    ('```json\n{\n  "name": "get_weather",\n  "argu', None, [], True),
    ('{"name": "get_we', None, [], True),
    ('<tool_call>\n{"name": "translate", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "get_weather", "argu',
     None, ["translate"], True),
    ('<tool_call>\n{"name": "translate", "arguments": {}}\n</tool_', None, ["translate"], False),  # only markup was cut
    ('<tool_call>\n{"name": "translate", "arguments": {}}\n</tool_call>\n<tool', None, ["translate"], False),
    ('```json\n{"name": "translate", "arguments": {}}\n``', None, ["translate"], False),
    ("The answer is <tool", "The answer is", [], False),
    ("Here:\n```js", "Here:", [], False),
    ("Here:\n```json\n", "Here:", [], False),
    ('{"name": "Alice", "age": 3', '{"name": "Alice", "age": 3', [], False),  # not a call: content as cut
    ("Plain text cut in the mid", "Plain text cut in the mid", [], False),
    ("<tool_call>\n<function=get_weather>\n<parameter=city>\nPar", None, [], True),
    ("<tool_call>\n<function=translate>\n<parameter=text>\nx\n</parameter>\n</function>\n</tool_call>\n"
     "<tool_call>\n<function=get_weather>\n<param", None, ["translate"], True),
    ('Ok.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"ci', "Ok.", [], True),
    ("Ok.<｜tool▁calls▁begin｜>", "Ok.", [], True),
    ('functools[{"name": "translate", "arguments": {}}, {"name": "get_we', None, [], True),  # one array: all or none
    ("Use functools", "Use", [], False),
    ("Ok.<｜tool▁calls▁be", "Ok.", [], False),
]


@pytest.mark.parametrize("text,content,names,cut", CUT_CASES)
def test_cut_by_max_tokens_leaks_nothing(text: str, content: str | None, names: list[str], cut: bool) -> None:
    for cuts in ([], list(range(len(text)))):
        parser = ToolCallStreamParser(TOOLS)
        prev, events = 0, []
        for c in cuts + [len(text)]:
            events += parser.feed(text[prev:c])
            prev = c
        got_content, calls = _summary(events + parser.finish(length=True))
        assert (got_content, [n for n, _ in calls], parser.cut_call) == (content, names, cut)
    assert parse_tool_calls(text, TOOLS, length=True)[0] == content


def test_end_inside_closing_markup_is_not_content() -> None:
    """Even without a length cut, a dangling `</tool_` after a call never becomes content."""
    content, calls = parse_tool_calls('<tool_call>\n{"name": "translate", "arguments": {}}\n</tool_call', TOOLS)
    assert content is None and [c.name for c in calls] == ["translate"]
