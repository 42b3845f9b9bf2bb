"""Constrained decoding: JSON Schema output, forced tool calls, and `auto` tool calls constrained
once they start, as per-sequence logits processors.

Engine: xgrammar. Measured on this project's 2-core CPU box against llguidance 1.9.1, for a
two-tool tool-call grammar, SmolLM2 (49k ids) / Qwen2.5 (151k ids):
  - xgrammar 0.2.8: vocab index 0.02 s / 0.07 s; grammar compile 8-16 ms / 35-53 ms; mask
    0.008 ms / 0.030 ms median per token; the whole processor (advance, mask, apply) 0.14 ms /
    0.23 ms median per token.
  - llguidance 1.9.1: tokenizer index 0.3-0.7 s / 1.2-1.7 s (it needs the HF tokenizer.json, not
    raw token bytes); mask 0.008-0.010 ms median at 49k with spikes to 1.5-95 ms; at 151k it treats
    every added token as special, so Qwen's non-special `<tool_call>` token is allowed by the mask
    and then refused by the matcher: a forced Qwen tool call dies on its first token.
xgrammar takes the raw token bytes our tokenizer already has, is as fast or faster, and is the
maintained default of vLLM/SGLang/TensorRT-LLM; it is pinned by the `grammar` extra.

Forced output (response_format, required/named tool_choice) is fixed, compact JSON (`", "` and
`": "` separators, properties in schema order): no free whitespace, so a weak model cannot wander
into endless blank lines. An `auto` call continues the model's own style: whitespace is free but
each run is at most _MAX_WS characters.

Auto mode, measured (tests/test_grammar.py, bench/grammar_overhead.py): while the output is free
text the processor only decodes the token and feeds the parser, ~10 us per token at 151k ids; a
call grammar compiles in ~70-100 ms at 151k for a simple tool (once per tool set and format, in the
background from when a call region opens, then cached).

Every compile runs on grammar_compile.py's pool (its own threads, lower CPU priority, a deadline on
each wait, a cache bounded by bytes); xgrammar compiles on that thread alone (max_threads=1), so a
compile never takes more than the pool's share of the cores from the step.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dashchat.engine.types import LogitsProcessorFactory, NotReady
from dashchat.server.text.grammar_compile import CompileCache, CompileLimits
from dashchat.server.text.reasoning import ReasoningFormat, ThinkStart
from dashchat.server.text.tool_parser import (
    DS_CALL_BEGIN,
    DS_CALL_END,
    DS_CALLS_END,
    DS_SEP,
    FENCE,
    TAG_CLOSE,
    TAG_OPEN,
    XML_FUNCTION,
    XML_FUNCTION_END,
    XML_PARAMETER,
    XML_PARAMETER_END,
    ToolCallStreamParser,
)

log = logging.getLogger(__name__)

TOOL_CALL_BEGIN = "<tool_call>\n"
TOOL_CALL_END = "\n</tool_call>"
TOOL_CALL_SEPARATOR = "\n"  # between parallel calls
_SEPARATORS = (", ", ": ")
_MAX_WS = 16  # longest whitespace run inside an auto-mode call (free style, but no endless blank lines)
_MIN_PARALLEL_CALLS, _MAX_CALLS = 4, 16  # parallel calls per answer: max(4, number of tools), at most 16
_NEG_INF = np.float32(-np.inf)
# Special tokens (chat markup, skipped when detokenizing) must never stand in for grammar text.
_SPECIAL_SHAPE = re.compile(rb"^(<[^<>\s]{1,64}>|\[[A-Za-z_0-9]{2,32}\])$")


# ---------------------------------------------------------------- request validation


def check_json_schema(schema: Any, param: str) -> None:
    """Raise ValueError naming `param` unless `schema` is a valid JSON Schema (draft 2020-12)."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"'{param}' must be a JSON Schema object, got {type(schema).__name__}.")
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"'{param}' is not a valid JSON Schema: {e.message}" + (f" (at {where})" if where else ""))


def validate_tools(tools: list[dict[str, Any]], param: str = "tools") -> None:
    """Each tool: type "function", a non-empty name, a valid JSON Schema as `parameters` (if any)."""
    if not isinstance(tools, list):
        raise ValueError(f"'{param}' must be a list.")
    for i, tool in enumerate(tools):
        where = f"{param}[{i}]"
        if not isinstance(tool, dict):
            raise ValueError(f"'{where}' must be an object.")
        if tool.get("type", "function") != "function":
            raise ValueError(f"'{where}.type' must be 'function'.")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise ValueError(f"'{where}.function' is required.")
        name = fn.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"'{where}.function.name' is required and must be a non-empty string.")
        if fn.get("parameters") is not None:
            params = fn["parameters"]
            if not isinstance(params, dict):
                raise ValueError(f"'{where}.function.parameters' must be a JSON Schema object.")
            check_json_schema(params, f"{where}.function.parameters")


# ---------------------------------------------------------------- grammar pieces (xgrammar structural tags)


def _const(value: str) -> dict[str, Any]:
    return {"type": "const_string", "value": value}


def _ebnf(grammar: str) -> dict[str, Any]:
    return {"type": "grammar", "grammar": grammar}


def _seq(*elements: dict[str, Any]) -> dict[str, Any]:
    return {"type": "sequence", "elements": list(elements)}


def _any_of(elements: list[dict[str, Any]]) -> dict[str, Any]:
    return elements[0] if len(elements) == 1 else {"type": "or", "elements": elements}


def _repeat(content: dict[str, Any], most: int) -> dict[str, Any]:
    return {"type": "repeat", "min": 0, "max": most, "content": content}


def _ws(most: int, chars: str = " \\t\\r\\n") -> dict[str, Any]:
    return _ebnf(f"root ::= [{chars}]{{0,{most}}}")


def max_calls(n_tools: int, parallel: bool) -> int:
    """How many calls one answer may hold: a bound, so a weak model cannot loop until max_tokens."""
    return min(_MAX_CALLS, max(_MIN_PARALLEL_CALLS, n_tools)) if parallel else 1


def _calls(first: dict[str, Any], unit: dict[str, Any], sep: dict[str, Any], most: int,
           tail: dict[str, Any]) -> dict[str, Any]:
    """`first`, then up to most-1 more `unit`s, then `tail`: a little whitespace allowed before EOS so
    that the choice "end or another call" is made where the model shows it (after the newline)."""
    if most <= 1:
        return first
    return _seq(first, _repeat(_seq(sep, unit), most - 1), tail)


# ---------------------------------------------------------------- the processors


class _Processor:
    """One sequence's grammar state: advances on the tokens the engine sampled, masks the next row.

    `start`: output tokens before it are not the grammar's (auto mode: the free text before a call);
    `prefix`: text the grammar must take first (the part of the call the model already wrote freely);
    `end_check`: where the grammar may end or go on (after a complete tool call), it goes on only when
    the model itself puts at least half its probability on what the grammar allows there; otherwise
    EOS. Without this a weak model that wants to write prose is steered into one more call, and another.
    """

    def __init__(self, backend: GrammarBackend, compiled: Any, start: int = 0, prefix: bytes = b"",
                 end_check: bool = False) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self._backend = backend
        self._compiled = compiled
        self._start, self._prefix, self._end_check = start, prefix, end_check
        self._bitmask = xgr.allocate_token_bitmask(1, backend.vocab_size)
        self.ok = self._restart()

    def _restart(self) -> bool:
        self._matcher = self._xgr.GrammarMatcher(self._compiled)
        self._seen: list[int] = []
        self._failed = bool(self._prefix) and not self._matcher.accept_string(self._prefix)
        return not self._failed

    def _advance(self, output_token_ids: Sequence[int]) -> None:
        n = self._start + len(self._seen)
        if len(output_token_ids) < n or (self._seen and output_token_ids[n - 1] != self._seen[-1]):
            # The sequence was rewound (never done today, but cheap to honour): replay from scratch.
            self._restart()
            n = self._start
        for tok in output_token_ids[n:]:
            self._seen.append(tok)
            if self._failed or self._matcher.is_terminated():
                continue
            if not self._matcher.accept_token(tok):
                # Something after us (logit_bias, min_tokens) picked a token the grammar forbids.
                log.warning("grammar: sampled token %d is not allowed here; forcing EOS", tok)
                self._failed = True

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        self._advance(output_token_ids)
        if self._failed or self._matcher.is_terminated():
            return self._backend.force_eos(logits)
        self._matcher.fill_next_token_bitmask(self._bitmask)
        return self._backend.apply_mask(self._bitmask, logits, self._end_check)


@dataclass(frozen=True)
class _ToolSpec:
    tools: list[dict[str, Any]]
    parallel: bool
    key: str


class _TriggeredProcessor:
    """`auto`: the output is free until it starts a tool call, as ToolCallStreamParser sees one
    (`open_call`); from there the rest is constrained to complete calls of offered tools in that
    same format, then EOS. While free, the cost per token is decoding it and feeding the parser."""

    def __init__(self, backend: GrammarBackend, spec: _ToolSpec) -> None:
        self._backend, self._spec = backend, spec
        self._reset()

    def _reset(self) -> None:
        self._parser = ToolCallStreamParser(self._spec.tools)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._n = 0  # output tokens watched
        self._last = -1  # the last of them (to notice a rewind)
        self._inner: _Processor | None = None
        self._released = False  # a call start the grammar could not take over: free to the end
        self._warm: set[str] = set()
        self._pending: tuple[str, int] | None = None  # a call start whose grammar is still compiling
        self._pending_since = 0.0

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_token_ids)
        if n < self._n or (self._n and output_token_ids[self._n - 1] != self._last):
            self._reset()  # rewound: watch again from the start
        if self._inner is not None:
            return self._inner(output_token_ids, logits)
        if self._pending is not None:
            return self._trigger(self._pending, output_token_ids, logits)
        if self._released or n == self._n:
            return logits
        vocab = self._backend.token_bytes
        for tok in output_token_ids[self._n :]:
            piece = self._decoder.decode(vocab[tok]) if 0 <= tok < len(vocab) else ""
            if piece:
                self._text += piece
                self._parser.feed(piece)
        self._n, self._last = n, output_token_ids[-1]
        region = self._parser.region
        if region is None:
            return logits
        if region not in self._warm:  # a call may be coming: compile its grammar in the background
            self._warm.add(region)
            self._backend.triggered_grammar(self._spec, region)
        hit = self._parser.open_call()
        if hit is None:
            return logits
        return self._trigger(hit, output_token_ids, logits)

    def _trigger(self, hit: tuple[str, int], output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """The output has started a call: constrain the rest. Its grammar compiles in the background
        (usually it started when the call region opened); until it is ready this sequence waits
        (NotReady: no token this step) and the rest of the batch goes on decoding."""
        kind, start = hit
        compiled = self._backend.triggered_grammar(self._spec, kind)
        if compiled is None and not self._backend.triggered_grammar_done(self._spec, kind):
            if self._pending is None:
                self._pending_since = time.monotonic()
            if time.monotonic() - self._pending_since < self._backend.compiles.limits.timeout_s:
                self._pending = hit
                raise NotReady(f"the {kind} tool-call grammar is still compiling")
            # Past the compile deadline: the call goes on unconstrained (parsed as usual); the
            # compile finishes in the background and serves the next call.
            log.info("grammar: the %s tool-call grammar missed its compile deadline; call left free", kind)
        self._pending = None
        self._released = True
        if compiled is None:
            return logits
        prefix = self._text[start:].encode("utf-8") + self._decoder.getstate()[0]
        inner = _Processor(self._backend, compiled, start=len(output_token_ids), prefix=prefix, end_check=True)
        if not inner.ok:  # e.g. whitespace beyond what the grammar allows: leave this one free
            log.info("grammar: the %s call start %r does not fit the call grammar; left unconstrained",
                     kind, prefix[:80])
            return logits
        self._released, self._inner = False, inner
        return inner(output_token_ids, logits)


class _AfterReasoningProcessor:
    """Reasoning models: a grammar (`make_inner`) that applies to the answer only. The thinking is
    free; the grammar starts with the token after the one that closes the block, and sees only
    the tokens from there on (so a forced call or a JSON schema never lands inside the thinking).

    `start` MAYBE (the model may or may not open a block): the first token may be the opener or
    whatever the grammar allows first; the opener means thinking, anything else means the grammar
    has begun. This needs the opener to be one token (Qwen3, DeepSeek-R1); otherwise the grammar
    applies from the first token, as if thinking were off.
    """

    def __init__(self, backend: GrammarBackend, make_inner: LogitsProcessorFactory, fmt: ReasoningFormat,
                 start: ThinkStart) -> None:
        self._backend, self._make_inner, self._fmt, self._start = backend, make_inner, fmt, start
        self._opener = backend.single_token(fmt.open) if start is ThinkStart.MAYBE else None
        self._reset()

    def _reset(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._text = ""
        self._n = 0  # output tokens watched
        self._inner: Any = None
        self._offset = 0  # output tokens before the grammar's first
        self._thinking = self._start is ThinkStart.INSIDE
        if self._start is ThinkStart.MAYBE and self._opener is None:
            self._inner = self._make_inner()  # cannot offer the opener: the grammar from the start

    def __call__(self, output_token_ids: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        n = len(output_token_ids)
        if n < self._n:
            self._reset()  # rewound: watch again from the start
        if self._inner is None and not self._thinking and self._start is ThinkStart.MAYBE:
            if n == 0:  # the first token: the opener, or the answer under the grammar
                assert self._opener is not None
                masked = self._make_inner()([], logits.clone())
                masked[self._opener] = logits[self._opener]
                return masked
            if output_token_ids[0] == self._opener:
                self._thinking, self._n = True, 1
            else:
                self._inner, self._offset = self._make_inner(), 0
        if self._thinking:
            self._watch(output_token_ids)
        if self._inner is None:
            return logits
        return self._inner(output_token_ids[self._offset :], logits)

    def _watch(self, output_token_ids: Sequence[int]) -> None:
        vocab = self._backend.token_bytes
        closer = self._fmt.close
        for i in range(self._n, len(output_token_ids)):
            tok = output_token_ids[i]
            self._text += self._decoder.decode(vocab[tok]) if 0 <= tok < len(vocab) else ""
            if closer in self._text:
                self._thinking = False
                self._inner, self._offset = self._make_inner(), i + 1
                break
            self._text = self._text[-(len(closer) - 1) :]  # a tail that may start the closer
        self._n = len(output_token_ids)


# ---------------------------------------------------------------- the backend


def _special_ids(tokenizer: Any, vocab: list[bytes]) -> set[int]:
    ids = getattr(tokenizer, "special_token_ids", None) or getattr(tokenizer, "all_special_ids", None)
    if ids:
        return {int(i) for i in ids}
    # Fall back to asking the tokenizer: a markup-shaped token that decodes to nothing is special.
    out = set()
    for i, b in enumerate(vocab):
        if b and _SPECIAL_SHAPE.match(b):
            try:
                if tokenizer.decode([i], skip_special_tokens=True) == "":
                    out.add(i)
            except (AttributeError, TypeError, ValueError) as e:  # no usable decode: keep the token
                log.debug("grammar: cannot tell whether token %d is special: %s", i, e)
    return out


def _token_bytes(tokenizer: Any) -> list[bytes]:
    if hasattr(tokenizer, "all_token_bytes"):
        return [bytes(b) for b in tokenizer.all_token_bytes()]
    return [bytes(tokenizer.token_bytes(i)) for i in range(int(tokenizer.vocab_size))]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, ensure_ascii=False)


class GrammarBackend:
    """Compiles JSON Schema / tool-call grammars for one tokenizer and hands out processor factories."""

    def __init__(self, tokenizer: Any, vocab_size: int, limits: CompileLimits | None = None) -> None:
        import xgrammar as xgr

        if sys.byteorder != "little":  # the CPU mask path reads xgrammar's int32 bitmask as bytes
            raise RuntimeError("constrained decoding needs a little-endian host")
        self._xgr = xgr
        vocab = _token_bytes(tokenizer)[:vocab_size]
        special = _special_ids(tokenizer, vocab)
        # xgrammar treats empty tokens as special: never matched by grammar text.
        encoded = [b"" if i in special else b for i, b in enumerate(vocab)]
        self.token_bytes = encoded  # what each id adds to the text the parser sees (auto mode watches it)
        self.vocab_size = int(vocab_size)  # ids beyond the tokenizer's vocab are masked out by xgrammar
        self.eos_token_ids = sorted(i for i in getattr(tokenizer, "eos_token_ids", ()) if 0 <= i < vocab_size)
        if not self.eos_token_ids:
            raise ValueError("the tokenizer has no EOS token inside the model's vocabulary")
        info = xgr.TokenizerInfo(
            encoded, xgr.VocabType.RAW, vocab_size=self.vocab_size, stop_token_ids=self.eos_token_ids
        )
        self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.compiles = CompileCache(limits or CompileLimits())
        self._eos_index: dict[torch.device, torch.Tensor] = {}
        self._single: dict[str, int | None] = {}

    # -- public API -------------------------------------------------------------
    def json_schema(self, schema: dict[str, Any] | None) -> LogitsProcessorFactory:
        """Output is one JSON value valid against `schema`; None: any JSON object (json_object mode)."""
        if schema is None:
            any_object = {"type": "object"}
            return self._factory("schema", any_object, lambda: self._compile_schema(any_object, "response_format"),
                                 "The JSON object grammar")
        check_json_schema(schema, "response_format.json_schema.schema")
        return self._factory("schema", schema, lambda: self._compile_schema(schema, "response_format.json_schema.schema"),
                             "The schema in 'response_format.json_schema.schema'")

    def tool_calls(self, tools: list[dict[str, Any]], parallel: bool) -> LogitsProcessorFactory:
        """Output is `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, once or (parallel)
        up to `max_calls` times joined by a newline; arguments follow each tool's `parameters` schema.
        After each complete call the model may end (see `_Processor`'s end_check)."""
        if not tools:
            raise ValueError("'tools' must name at least one function to call.")
        validate_tools(tools)
        key = {"tools": [t["function"] for t in tools], "parallel": parallel}
        compiled = self.compiles.get("tools:" + _canonical(key), lambda: self._compile_tools(tools, parallel),
                                     "The tools' parameter schemas")
        return lambda: _Processor(self, compiled, end_check=parallel)

    def triggered_tool_calls(self, tools: list[dict[str, Any]], parallel: bool) -> LogitsProcessorFactory:
        """`tool_choice: auto`: free text until the output starts a call the way ToolCallStreamParser
        recognises one, then the rest is a complete call (or up to `max_calls` when parallel) of offered
        tools in that same format, then EOS:
          `<tool_call>`            -> `{"name": ..., "arguments": {...}}` `</tool_call>` (parallel: more
                                      such tags)
          ```json fence + `{"name"` -> the call (parallel: or a JSON array of calls), the closing fence
          `{"name"` / `[{"name"` as the first output (bare JSON, Llama 3.x, "arguments" or "parameters"),
          or after [TOOL_CALLS] / <|python_tag|> -> the call (parallel: or an array)
          `<tool_call>` + `<function=`  -> Qwen3-Coder / GLM XML: `<parameter=K>` blocks, `</function>`
          `<｜tool▁calls▁begin｜>`       -> DeepSeek call blocks (V3/R1 or V3.1 layout), the closing marker
        A leading JSON value is a call start only when its first key is "name" and its value is (a
        prefix of) an offered tool's name; `{"name": "Alice", ...}` or `{"title": ...}` stays free, so
        JSON the user asked for is never forced into a call. Whitespace inside is free (bounded), as
        models write their own style (Qwen pretty-prints). Grammars compile when a call region opens
        (in the background) and are cached; a tool schema xgrammar cannot compile leaves auto free."""
        if not tools:
            raise ValueError("'tools' must name at least one function to call.")
        validate_tools(tools)
        spec = _ToolSpec(tools, parallel, _canonical({"tools": [t["function"] for t in tools], "parallel": parallel}))
        return lambda: _TriggeredProcessor(self, spec)

    def after_reasoning(self, factory: LogitsProcessorFactory, fmt: ReasoningFormat,
                        start: ThinkStart) -> LogitsProcessorFactory:
        """`factory`'s grammar for the answer of a thinking model: free until the block closes."""
        return lambda: _AfterReasoningProcessor(self, factory, fmt, start)

    def single_token(self, text: str) -> int | None:
        """The id of the one token that spells `text`, if there is exactly one (e.g. `<think>`)."""
        if text not in self._single:
            raw = text.encode("utf-8")
            ids = [i for i, b in enumerate(self.token_bytes) if b == raw]
            self._single[text] = ids[0] if len(ids) == 1 else None
        return self._single[text]

    def triggered_grammar(self, spec: _ToolSpec, kind: str) -> Any | None:
        """The compiled grammar for a call region of `kind`; None when it cannot compile or while it
        is still compiling in the background."""
        fut = self.compiles.future("trig:" + kind + ":" + spec.key, lambda: self._compile_triggered(spec, kind))
        if not fut.done():
            return None
        try:
            return fut.result()
        except ValueError as e:
            log.info("grammar: auto tool calls stay unconstrained: %s", e)
            return None

    def triggered_grammar_done(self, spec: _ToolSpec, kind: str) -> bool:
        """Whether triggered_grammar(spec, kind) has finished compiling (or failed): it will not wait."""
        return self.compiles.done("trig:" + kind + ":" + spec.key)

    def force_eos(self, logits: torch.Tensor) -> torch.Tensor:
        """Only EOS may follow (finite logit, whatever the model or a later processor thought)."""
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            row = np.full(logits.numel(), _NEG_INF, dtype=np.float32)  # numpy: no OpenMP stalls
            row[self.eos_token_ids] = 0.0
            return torch.from_numpy(row)
        idx = self._eos_index.get(logits.device)
        if idx is None:
            idx = self._eos_index[logits.device] = torch.tensor(self.eos_token_ids, device=logits.device)
        logits.fill_(float("-inf"))
        logits[idx] = 0.0
        return logits

    def apply_mask(self, bitmask: torch.Tensor, logits: torch.Tensor, end_check: bool = False) -> torch.Tensor:
        """Logits of tokens the bitmask forbids become -inf (see `_Processor` for end_check)."""
        words = bitmask.numpy()[0]
        bits = None
        if end_check and any((int(words[e >> 5]) >> (e & 31)) & 1 for e in self.eos_token_ids):
            bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=logits.numel()).view(np.bool_)
            if self._prefers_end(bits, logits):
                return self.force_eos(logits)
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy, single-threaded: ~0.1 ms at 151k ids when the mask forces text (~0.5 ms worst
            # case). xgrammar's CPU kernel takes ~0.6 ms there, and torch's OpenMP ops wait ~8 ms for
            # a descheduled worker whenever the cores are busy (measured on the 2-core box).
            if bits is None:
                bits = np.unpackbits(words.view(np.uint8), bitorder="little", count=logits.numel()).view(np.bool_)
            return torch.from_numpy(np.where(bits, logits.numpy(), _NEG_INF))
        row = logits if logits.is_contiguous() else logits.contiguous()
        mask = bitmask.to(logits.device, non_blocking=True)
        self._xgr.apply_token_bitmask_inplace(row.view(1, -1), mask, vocab_size=self.vocab_size)
        return row

    def _prefers_end(self, allowed: np.ndarray, logits: torch.Tensor) -> bool:
        """Whether the model puts less than half its probability on grammar-allowed non-EOS tokens."""
        x = logits.detach().float().cpu().numpy()
        top = x.max()
        if not np.isfinite(top):
            return False
        p = np.exp(x - top)
        go_on = allowed.copy()
        go_on[self.eos_token_ids] = False
        return float(p[go_on].sum()) * 2 < float(p.sum())

    # -- compiling ----------------------------------------------------------------
    def _factory(self, kind: str, key: Any, compile_fn: Callable[[], Any], what: str) -> LogitsProcessorFactory:
        compiled = self.compiles.get(kind + ":" + _canonical(key), compile_fn, what)
        return lambda: _Processor(self, compiled)

    def _schema_grammar(self, schema: Any, param: str, compact: bool = True) -> Any:
        try:
            if compact:
                return self._xgr.Grammar.from_json_schema(
                    json.dumps(schema), any_whitespace=False, separators=_SEPARATORS, strict_mode=True
                )
            return self._xgr.Grammar.from_json_schema(
                json.dumps(schema), any_whitespace=True, max_whitespace_cnt=_MAX_WS, strict_mode=True
            )
        except Exception as e:  # xgrammar refuses some valid-but-unsupported schemas
            raise ValueError(f"'{param}' is not supported for constrained decoding: {e}") from None

    def _compile_schema(self, schema: Any, param: str) -> Any:
        return self._compiler.compile_grammar(self._schema_grammar(schema, param))

    def _compile_format(self, fmt: dict[str, Any]) -> Any:
        return self._compiler.compile_structural_tag(json.dumps({"type": "structural_tag", "format": fmt}))

    def _call(self, tools: list[dict[str, Any]], compact: bool) -> dict[str, Any]:
        """One `{"name": ..., "arguments": {...}}` object of any offered tool."""
        alternatives = []
        for i, tool in enumerate(tools):
            fn = tool["function"]
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            args = _ebnf(str(self._schema_grammar(params, f"tools[{i}].function.parameters", compact)))
            name = json.dumps(fn["name"], ensure_ascii=False)
            if compact:
                alternatives.append(_seq(_const('{"name": ' + name + ', "arguments": '), args, _const("}")))
            else:
                # Llama 3.x writes "parameters" where others write "arguments".
                head = (f'root ::= "{{" ws "\\"name\\"" ws ":" ws {json.dumps(name)} ws "," ws key ws ":" ws'
                        '\nkey ::= "\\"arguments\\"" | "\\"parameters\\""'
                        f"\nws ::= [ \\t\\r\\n]{{0,{_MAX_WS}}}")
                alternatives.append(_seq(_ebnf(head), args, _seq(_ws(_MAX_WS), _const("}"))))
        return _any_of(alternatives)

    def _xml_call(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """One Qwen3-Coder / GLM `<function=NAME>` block of any offered tool: its `<parameter=KEY>`
        blocks in the schema's order, the required ones present, then `</function>`. A string value is
        free text that never holds `</p` (or one of its enum values); any other value is JSON that
        follows the parameter's own schema (the parser types values the same way)."""
        ws = _ws(_MAX_WS)
        text = _ebnf('root ::= ([^<] | "<" [^/] | "</" [^p])*')
        newline = _ws(1, "\\n")
        alternatives = []
        for i, tool in enumerate(tools):
            fn = tool["function"]
            params = fn.get("parameters") or {}
            props = params.get("properties") or {}
            required = set(params.get("required") or [])
            blocks: list[dict[str, Any]] = []
            for key, prop in props.items():
                kind = prop.get("type") if isinstance(prop, dict) else None
                enum = prop.get("enum") if isinstance(prop, dict) else None
                if kind in (None, "string") and isinstance(enum, list) and enum and all(isinstance(v, str) for v in enum):
                    value = _seq(newline, _any_of([_const(v) for v in enum]), newline)
                elif kind in (None, "string"):
                    value = text
                else:
                    where = f"tools[{i}].function.parameters.properties.{key}"
                    value = _seq(ws, _ebnf(str(self._schema_grammar(prop, where, compact=False))), ws)
                block = _seq(_const(XML_PARAMETER + key + ">"), value, _const(XML_PARAMETER_END), ws)
                blocks.append(block if key in required else _repeat(block, 1))
            alternatives.append(_seq(_const(XML_FUNCTION + fn["name"] + ">"), ws, *blocks, _const(XML_FUNCTION_END)))
        return _any_of(alternatives)

    def _deepseek_call(self, tools: list[dict[str, Any]]) -> dict[str, Any]:
        """One DeepSeek call of any offered tool, V3/R1 style (type, separator, name, fenced JSON) or
        V3.1 style (name, separator, JSON); the arguments follow the tool's schema."""
        alternatives = []
        for i, tool in enumerate(tools):
            fn = tool["function"]
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            args = _ebnf(str(self._schema_grammar(params, f"tools[{i}].function.parameters", compact=False)))
            name = fn["name"]
            alternatives.append(_seq(_const(DS_CALL_BEGIN + "function" + DS_SEP + name + "\n```json\n"), args,
                                     _const("\n```" + DS_CALL_END)))
            alternatives.append(_seq(_const(DS_CALL_BEGIN + name + DS_SEP), args, _const(DS_CALL_END)))
        return _any_of(alternatives)

    def _compile_tools(self, tools: list[dict[str, Any]], parallel: bool) -> Any:
        unit = _seq(_const(TOOL_CALL_BEGIN), self._call(tools, compact=True), _const(TOOL_CALL_END))
        most = max_calls(len(tools), parallel)
        return self._compile_format(_calls(unit, unit, _const(TOOL_CALL_SEPARATOR), most, _ws(2, "\\n")))

    def _compile_triggered(self, spec: _ToolSpec, kind: str) -> Any:
        """From the start of a call region's body (after `<tool_call>`, after the fence's info line,
        at the first `{`/`[` of bare JSON) to EOS; see `triggered_tool_calls`."""
        call = self._call(spec.tools, compact=False)
        most = max_calls(len(spec.tools), spec.parallel)
        ws = _ws(_MAX_WS)
        more = [_repeat(_seq(ws, _const(","), ws, call), most - 1)] if most > 1 else []
        calls = _any_of([call, _seq(_const("["), ws, call, *more, ws, _const("]"))])
        if kind == "tag":  # more calls: each in its own tag, an explicit marker of intent
            call = _any_of([call, self._xml_call(spec.tools)])  # Hermes JSON, or Qwen3-Coder XML
            first = _seq(ws, call, ws, _const(TAG_CLOSE))
            unit = _seq(_const(TAG_OPEN), ws, call, ws, _const(TAG_CLOSE))
            return self._compile_format(_calls(first, unit, _ws(4), most, _ws(2)))
        if kind == "deepseek":  # after <｜tool▁calls▁begin｜>: calls, then the closing marker
            one = self._deepseek_call(spec.tools)
            return self._compile_format(_seq(_calls(_seq(ws, one), one, ws, most, ws), ws, _const(DS_CALLS_END)))
        # Fenced or bare JSON: more calls only as one JSON array. A second value after a call is
        # too often the model making up the tool's result ({"name": ...}\n{"temperature": 22}).
        if kind == "fence":
            return self._compile_format(_seq(ws, calls, ws, _const(FENCE)))
        if kind == "bare":
            return self._compile_format(calls)
        return self._compile_format(_seq(ws, calls))  # after [TOOL_CALLS] or <|python_tag|>
