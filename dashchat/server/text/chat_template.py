"""Render OpenAI-shaped chat messages into a prompt with the model's (HF) Jinja chat template.

The Jinja environment mirrors transformers' `apply_chat_template` so hub templates render
identically here. Messages are normalized first (content parts joined, JSON-string tool
arguments parsed, legacy `function` messages turned into tool results), and templates that
know nothing of tools get a built-in tool prompt plus a text rendering of tool history.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2 import meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when neither the request nor the tokenizer provides a template.
DEFAULT_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template rejected the conversation (or is broken): the server answers 400."""


# ---------------------------------------------------------------- Jinja environment


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (HF assistant-mask marker): render the body as is."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes; HF templates expect plain json.dumps.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore attributes (no path to CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=64)
def _compile(source: str) -> tuple[jinja2.Template, frozenset[str]]:
    """Compile once per distinct template; also return the free variables it reads."""
    env = _environment()
    try:
        names = frozenset(meta.find_undeclared_variables(env.parse(source)))
        return env.from_string(source), names
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"invalid chat template: {e}") from e


def template_supports_tools(chat_template: str) -> bool:
    """A template that never reads `tools` (nor a message's) cannot show them to the model."""
    return "tools" in _compile(chat_template)[1] or template_reads_message_tools(chat_template)


# ---------------------------------------------------------------- message normalization


# An image part, as Qwen2-VL's template writes it (the server then widens the pad to the image's tokens).
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        images = False
        for part in content:
            if isinstance(part, dict) and part.get("type") == "image":
                parts.append(IMAGE_PLACEHOLDER)
                images = True
            elif isinstance(part, dict) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, str):
                parts.append(part)
        return ("" if images else "\n").join(parts)  # Qwen2-VL's template joins parts as they are
    return str(content)


def _parse_arguments(arguments: Any) -> Any:
    # Templates (Qwen2.5) `tojson` the arguments: a JSON string would be double-encoded.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def _normalize(messages: list[dict[str, Any]], keep_developer: bool, keep_reasoning: bool = False
               ) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    legacy_ids: list[str] = []  # ids given to legacy function_calls, matched by later function results
    for i, raw in enumerate(messages):
        m = copy.deepcopy(dict(raw))
        role = m.get("role")
        if role == "developer" and not keep_developer:
            m["role"] = "system"
        if role == "function":  # legacy function result -> tool result
            m["role"] = "tool"
            m["tool_call_id"] = legacy_ids.pop(0) if legacy_ids else f"call_{i}"
        m["content"] = _text_of(m.get("content"))
        # The thinking of an assistant turn, as `reasoning_content` (or `reasoning`, the other name
        # clients use): only for templates that render it (Qwen3); others never see past thinking.
        reasoning = m.pop("reasoning", None)
        if m.get("reasoning_content") is None and isinstance(reasoning, str) and role == "assistant":
            m["reasoning_content"] = reasoning
        if not keep_reasoning or role != "assistant" or not isinstance(m.get("reasoning_content"), str):
            m.pop("reasoning_content", None)
        if role == "assistant":
            calls = list(m.get("tool_calls") or [])
            if m.get("function_call"):
                fc = m.pop("function_call")
                call_id = f"call_{i}"
                legacy_ids.append(call_id)
                calls.append({"id": call_id, "type": "function", "function": dict(fc)})
            for call in calls:
                fn = call.get("function") or {}
                fn["arguments"] = _parse_arguments(fn.get("arguments", {}))
                call["function"] = fn
                call.setdefault("type", "function")
            if calls:
                m["tool_calls"] = calls
            else:
                m.pop("tool_calls", None)
        out.append(m)
    return out


# ---------------------------------------------------------------- built-in tool prompt

_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

To call a function, reply with a JSON object holding the function name and its arguments within <tool_call></tool_call> XML tags, one per call:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>
Function results come back within <tool_response></tool_response> XML tags. If no function is needed, answer normally."""


def builtin_tool_prompt(tools: list[dict[str, Any]]) -> str:
    return _TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def _call_body(call: dict[str, Any]) -> dict[str, Any]:
    fn = call.get("function") or {}
    return {"name": fn.get("name", ""), "arguments": fn.get("arguments", {})}


def _call_text(call: dict[str, Any]) -> str:
    return "<tool_call>\n" + json.dumps(_call_body(call), ensure_ascii=False) + "\n</tool_call>"


def _functools_text(calls: list[dict[str, Any]]) -> str:
    return "functools" + json.dumps([_call_body(c) for c in calls], ensure_ascii=False)


def template_reads_message_tools(chat_template: str) -> bool:
    """Phi-4-mini's template takes the tools from the system message (`message['tools']`, a JSON
    string it writes between `<|tool|>` and `<|/tool|>`) rather than from a `tools` variable."""
    return any(k in chat_template for k in ("['tools']", '["tools"]', ".tools"))


_PHI_SYSTEM = "You are a helpful assistant with some tools."  # the system text of Phi-4-mini's tool examples


def _tools_in_system_message(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Phi-4-mini style: the tools' function objects as JSON on the system message, earlier calls as
    the `functools[...]` text the model writes, results as plain text."""
    out = _tools_as_text(messages, None, call_text=_functools_text)
    if tools:
        listing = json.dumps([t.get("function", t) for t in tools], ensure_ascii=False)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "tools": listing}
        else:
            out.insert(0, {"role": "system", "content": _PHI_SYSTEM, "tools": listing})
    return out


def _tools_as_text(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                   call_text: Any = None) -> list[dict[str, Any]]:
    """For tool-unaware templates: tool prompt into the system message, tool history as plain text
    (`call_text` writes an assistant turn's calls; default one Hermes tag each)."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # tool results waiting to become one user turn
    for m in messages:
        if m["role"] == "tool":
            pending.append("<tool_response>\n" + m["content"] + "\n</tool_response>")
            continue
        if pending:
            text = "\n".join(pending)
            pending = []
            if m["role"] == "user":  # keep user/assistant alternation for strict templates
                m = {**m, "content": text + "\n" + m["content"]}
            else:
                out.append({"role": "user", "content": text})
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = [call_text(m["tool_calls"])] if call_text else [_call_text(c) for c in m["tool_calls"]]
            texts = ([m["content"]] if m["content"] else []) + calls
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = "\n".join(texts)
        out.append(m)
    if pending:
        out.append({"role": "user", "content": "\n".join(pending)})
    if tools:
        prompt = builtin_tool_prompt(tools)
        if out and out[0]["role"] == "system":
            first = out[0]["content"]
            out[0] = {**out[0], "content": (first + "\n\n" + prompt) if first else prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


# ---------------------------------------------------------------- entry point


def render_chat_prompt(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """The prompt text for `messages` (OpenAI shape); raises ChatTemplateError on template errors."""
    source = chat_template or getattr(tokenizer, "chat_template", None) or DEFAULT_CHATML_TEMPLATE
    template, names = _compile(source)
    tools = list(tools) if tools else None
    msgs = _normalize(messages, keep_developer="developer" in source, keep_reasoning="reasoning_content" in source)
    if "tools" not in names:
        msgs = (_tools_in_system_message if template_reads_message_tools(source) else _tools_as_text)(msgs, tools)
        tools = None
    context: dict[str, Any] = {
        "bos_token": getattr(tokenizer, "bos_token", None) or "",
        "eos_token": getattr(tokenizer, "eos_token", None) or "",
        **template_kwargs,
        "messages": msgs,
        "tools": tools,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        return template.render(**context)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(str(e) or "chat template error") from e
    except (TypeError, KeyError, IndexError, AttributeError, ValueError) as e:
        # Mostly messages the template cannot handle (e.g. a missing field): a client error.
        raise ChatTemplateError(f"chat template failed on these messages: {e}") from e
