"""Find the tool calls in what a model wrote, streamed or whole.

Formats models really emit:
  <tool_call>{"name": ..., "arguments": {...}}</tool_call>   Hermes / Qwen (possibly several, close tag optional at the end)
  ```json\n{"name": ..., "arguments": {...}}\n```            fenced (what Qwen2.5-Coder-0.5B likes to do)
  {"name": ..., "arguments"|"parameters": {...}}             bare JSON (object or array) at the start of the message (Llama 3.x)
  <|python_tag|>{...}                                        Llama 3.x, when the tag survives detokenizing
  [TOOL_CALLS][{...}, ...]                                   Mistral
  functools[{...}, ...]                                      Phi-4-mini (no closing marker)
  <tool_call><function=NAME><parameter=K>V</parameter>...</function></tool_call>
                                                             Qwen3-Coder / GLM XML (values typed by the tool's schema)
  <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>
                                                             DeepSeek V3 / R1 (V3.1: NAME<｜tool▁sep｜>{...})

There is one implementation: a streaming state machine. `parse_tool_calls` feeds it the whole text at
once, so streamed and non-streamed answers agree by construction; every decision the machine makes
is one that later text cannot change, so any split of the text gives the same calls and content.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

_ALNUM = string.ascii_letters + string.digits

TAG_OPEN, TAG_CLOSE = "<tool_call>", "</tool_call>"
FENCE = "```"
MISTRAL = "[TOOL_CALLS]"
# Phi-4-mini's marker is plain text (the Python module's name), so it counts only right before its
# array's `[`, and if what follows is no call the word goes back into the content.
FUNCTOOLS = "functools["
PYTHON_TAG = "<|python_tag|>"
XML_FUNCTION, XML_FUNCTION_END = "<function=", "</function>"
XML_PARAMETER, XML_PARAMETER_END = "<parameter=", "</parameter>"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
_MARKERS = (TAG_OPEN, FENCE, MISTRAL, PYTHON_TAG, DS_CALLS_BEGIN, FUNCTOOLS)
# Calls written as delimited blocks rather than JSON values: region kind -> (block opener, block end).
_BLOCKS = {"tag": (XML_FUNCTION, XML_FUNCTION_END), "deepseek": (DS_CALL_BEGIN, DS_CALL_END)}
# Fence info strings whose body may be a call; anything else (```python ...) is code and stays content.
_JSON_LANGS = ("", "json", "json5", "jsonc", "tool_call", "tool_calls")
# The first key of a call object is one of these; any other first key releases the text at once.
_CALL_KEYS = frozenset({"name", "arguments", "parameters", "function", "type", "id"})
_SEPARATORS = " \t\r\n,;"


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of an object: json.dumps(..., ensure_ascii=False)


@dataclass
class ContentEvent:
    text: str


@dataclass
class ToolCallStartEvent:
    index: int
    id: str
    name: str


@dataclass
class ToolArgumentsEvent:
    index: int
    fragment: str


ParserEvent = ContentEvent | ToolCallStartEvent | ToolArgumentsEvent


# ---------------------------------------------------------------- what counts as a call


def tool_names(tools: list[dict[str, Any]]) -> set[str]:
    names = set()
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.add(fn["name"])
    return names


def _one_call(obj: Any, names: set[str]) -> tuple[str, str] | None:
    if not isinstance(obj, dict):
        return None
    if "name" not in obj and isinstance(obj.get("function"), dict):  # OpenAI-shaped {"type": "function", "function": {...}}
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or name not in names:
        return None
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters", None)
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = json.loads(args, strict=False)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return name, json.dumps(args, ensure_ascii=False)


def _calls_in(value: Any, names: set[str]) -> list[tuple[str, str]] | None:
    """A call object, or a non-empty array of them; None when it is anything else."""
    items = value if isinstance(value, list) else [value]
    calls = [_one_call(item, names) for item in items]
    if not calls or any(c is None for c in calls):
        return None
    return calls  # type: ignore[return-value]


def tool_schemas(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> the `properties` of its parameters schema (to type XML parameter values)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            props = params.get("properties") if isinstance(params, dict) else None
            out[fn["name"]] = props if isinstance(props, dict) else {}
    return out


_XML_PARAM = re.compile(r"<parameter=([^>\n]*)>(.*?)(?:</parameter>|(?=<parameter=)|$)", re.S)


def _xml_value(text: str, schema: Any) -> Any:
    """A parameter's text as the schema types it: strings verbatim, anything else as JSON if it parses."""
    if text.startswith("\n"):
        text = text[1:]
    if text.endswith("\n"):
        text = text[:-1]
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind is None or kind == "string" or (isinstance(kind, list) and "string" in kind):
        return text  # untyped or a string: verbatim, as the model wrote it
    try:
        return json.loads(text)
    except ValueError:
        low = text.strip().lower()
        if kind == "boolean" and low in ("true", "false"):
            return low == "true"
        return text


def _xml_name(block: str) -> str | None:
    """The NAME of `<function=NAME>` once its `>` has come."""
    end = block.find(">", len(XML_FUNCTION))
    return block[len(XML_FUNCTION):end].strip() if end >= 0 else None


def _xml_call(block: str, schemas: dict[str, dict[str, Any]]) -> tuple[str, str] | None:
    """`<function=NAME><parameter=K>V</parameter>...</function>` (the end may be missing)."""
    name = _xml_name(block)
    if name is None or name not in schemas:
        return None
    body = block[block.find(">", len(XML_FUNCTION)) + 1:]
    if body.endswith(XML_FUNCTION_END):
        body = body[: -len(XML_FUNCTION_END)]
    props = schemas[name]
    args = {k.strip(): _xml_value(v, props.get(k.strip(), {})) for k, v in _XML_PARAM.findall(body)}
    return name, json.dumps(args, ensure_ascii=False)


def _deepseek_call(block: str, names: set[str]) -> tuple[str, str] | None:
    """`<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\n{...}\n```<｜tool▁call▁end｜>` (V3, R1)
    or `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>` (V3.1); the end may be missing."""
    body = block[len(DS_CALL_BEGIN):]
    if body.endswith(DS_CALL_END):
        body = body[: -len(DS_CALL_END)]
    head, sep, rest = body.partition(DS_SEP)
    if not sep:
        return None
    if head.strip() == "function":
        name, _, args = rest.partition("\n")
        args = args.strip()
        if args.startswith(FENCE):
            args = args[args.find("\n") + 1:] if "\n" in args else ""
            args = args.strip()
            if args.endswith(FENCE):
                args = args[: -len(FENCE)]
    else:
        name, args = head, rest
    return _one_call({"name": name.strip(), "arguments": args.strip()}, names)


class _JsonScan:
    """Finds where a JSON value (object or array) ends, and rejects early what cannot be a call.

    Early rejection (before the value is complete) lets plain JSON answers stream: an object whose
    first key is not a call key, an array whose first element is not an object, or a first key
    "name" whose value is not (a prefix of) an offered tool name, is never a call.
    """

    def __init__(self, names: set[str] | frozenset[str] = frozenset()) -> None:
        self.text = ""
        self.names = names
        self._depth = 0
        self._in_str = False
        self._esc = False
        # 0 want {/[, 1 after [ want {, 2 after { want ", 3 in first key, 4 verified,
        # 5 after key "name" want :, 6 want the name's opening quote, 7 in the name value
        self._head = 0
        self._key_start = 0
        self.named = False  # the first key is "name" and its value is (a prefix of) an offered name

    def feed(self, chunk: str) -> tuple[str, int]:
        """Returns ("more"|"done"|"reject", number of chunk chars consumed)."""
        base = len(self.text)
        self.text += chunk
        for i in range(base, len(self.text)):
            ch = self.text[i]
            if self._head != 4:
                verdict = self._check_head(ch, i)
                if verdict == "reject":
                    self.text = self.text[: i + 1]
                    return "reject", i + 1 - base
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif ch == "\\":
                    self._esc = True
                elif ch == '"':
                    self._in_str = False
            elif ch == '"':
                self._in_str = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self.text = self.text[: i + 1]
                    return "done", i + 1 - base
        return "more", len(chunk)

    def _check_head(self, ch: str, i: int) -> str:
        h = self._head
        if h == 3:
            if self._esc or ch == "\\":
                return "ok"
            if ch == '"':
                try:
                    key = json.loads(self.text[self._key_start : i + 1])
                except ValueError:
                    return "reject"
                if key == "name" and self.names:
                    self._head = 5
                    return "ok"
                self._head = 4
                return "ok" if key in _CALL_KEYS else "reject"
            return "ok"
        if h >= 5:
            return self._check_name(ch, i)
        if ch in " \t\r\n" and h in (1, 2):
            return "ok"
        if h == 0 and ch in "{[":
            self._head = 2 if ch == "{" else 1
            return "ok"
        if h == 1 and ch == "{":
            self._head = 2
            return "ok"
        if h == 2 and ch == '"':
            self._head, self._key_start = 3, i
            return "ok"
        return "reject"

    def _check_name(self, ch: str, i: int) -> str:
        """The value of a first key "name": a string that is (so far) a prefix of an offered name."""
        h = self._head
        if h in (5, 6) and ch in " \t\r\n":
            return "ok"
        if h == 5:
            if ch != ":":
                return "reject"
            self._head = 6
            return "ok"
        if h == 6:
            if ch != '"':
                return "reject"  # a name that is not a string is no call
            self._head, self._key_start = 7, i + 1
            return "ok"
        if ch == "\\":  # escaped: let the full parse decide
            self._head = 4
            return "ok"
        value = self.text[self._key_start : i]
        if ch == '"':
            self._head = 4
            self.named = value in self.names
            return "ok" if self.named else "reject"
        value += ch
        if not any(n.startswith(value) for n in self.names):
            return "reject"
        self.named = True
        return "ok"


def _partial_marker_len(text: str, markers: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of a marker (held back)."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best


_INNER_MARKUP = (TAG_OPEN, TAG_CLOSE, MISTRAL, PYTHON_TAG, DS_CALLS_BEGIN)


def _markup_len(buf: str) -> int:
    """Length of separators or markup at the start of `buf` inside a call region; -1: cannot tell yet."""
    n = len(buf) - len(buf.lstrip(_SEPARATORS))
    if n:
        return n
    for m in _INNER_MARKUP:
        if buf.startswith(m):
            return len(m)
        if m.startswith(buf):
            return -1
    if buf.startswith(FENCE):  # ```json inside a tag: markup too
        j = len(FENCE)
        while j < len(buf) and (buf[j].isalnum() or buf[j] == "_"):
            j += 1
        if j == len(buf):
            return -1
        return j if buf[len(FENCE) : j].lower() in _JSON_LANGS else 0
    return -1 if FENCE.startswith(buf) else 0


# ---------------------------------------------------------------- the state machine


class ToolCallStreamParser:
    """Feed detokenized text as it comes; get content deltas and tool-call events.

    Content streams as it comes, minus: whitespace next to a call and at the very end (held until
    more text shows it is inner whitespace), and the few characters that may start markup.
    A call is announced (start + its full arguments) once its JSON is complete and names an offered
    tool; a suspected call that is not one is released as content. Markup never reaches content.
    When generation was cut by max_tokens (`finish(length=True)`), an unfinished call and partial
    markup are dropped instead, and `cut_call` tells the caller a call was lost.
    """

    def __init__(self, tools: list[dict[str, Any]]) -> None:
        self._names = tool_names(tools)
        self._schemas = tool_schemas(tools)
        self._buf = ""
        self._out: list[ParserEvent] = []
        self._mode = "start"  # start, text, seq, fence_info, fence_raw, tag_text
        self._ncalls = 0
        # content whitespace policy
        self._pending_ws = ""
        self._drop_ws = False  # right after a call: leading whitespace is markup-adjacent
        # call-sequence region (inside <tool_call>, a json fence, after [TOOL_CALLS] / python tag, bare)
        self._kind = ""
        self._closer: str | None = None
        self._raw = ""  # opening fence kept until we know whether it was a call
        self._region_calls = 0
        self._scan: _JsonScan | None = None
        self._block: str | None = None  # a delimited call being read (XML function, DeepSeek call)
        self._fed = 0  # characters fed so far
        self._region_start = 0  # offset (in all text fed) where the current call region's body starts
        self._length = False
        self._dropped = False  # finish(length=True) dropped markup or a call (and the whitespace before it)
        self.cut_call = False  # finish(length=True) dropped an unfinished call

    # -- public ---------------------------------------------------------------
    def feed(self, text: str) -> list[ParserEvent]:
        self._buf += text
        self._fed += len(text)
        self._run(final=False)
        return self._take()

    def finish(self, length: bool = False) -> list[ParserEvent]:
        """End of output; `length`: it was cut by max_tokens (drop what was cut, do not release it)."""
        self._length = length
        self._run(final=True)
        if self._ncalls == 0 and self._pending_ws and not self._dropped:
            self._out.append(ContentEvent(self._pending_ws))
        self._pending_ws = ""
        return self._take()

    @property
    def region(self) -> str | None:
        """The kind of call region being read ("tag", "fence", "bare", "line", "deepseek"), if any."""
        return self._kind if self._mode == "seq" else None

    def open_call(self) -> tuple[str, int] | None:
        """(region kind, offset of the region body in the text fed) while the text being read is the
        start of a call: right after <tool_call>, or a JSON value whose first key is "name" with (a
        prefix of) an offered tool name as its value. None otherwise. Constrained decoding in `auto`
        mode starts here (see grammar.GrammarBackend.triggered_tool_calls)."""
        if self._mode != "seq":
            return None
        if self._kind in ("tag", "deepseek") or (self._scan is not None and self._scan.named):
            return self._kind, self._region_start
        return None

    # -- output -----------------------------------------------------------------
    def _take(self) -> list[ParserEvent]:
        merged: list[ParserEvent] = []
        for ev in self._out:
            if isinstance(ev, ContentEvent) and merged and isinstance(merged[-1], ContentEvent):
                merged[-1] = ContentEvent(merged[-1].text + ev.text)
            else:
                merged.append(ev)
        self._out = []
        return merged

    def _content(self, text: str) -> None:
        if self._drop_ws:
            text = text.lstrip()
            if not text:
                return
            self._drop_ws = False
        full = self._pending_ws + text
        body = full.rstrip()
        self._pending_ws = full[len(body) :]
        if body:
            self._out.append(ContentEvent(body))

    def _calls(self, calls: list[tuple[str, str]]) -> None:
        self._pending_ws, self._drop_ws = "", True
        for name, args in calls:
            index = self._ncalls
            self._ncalls += 1
            call_id = new_call_id()
            self._out.append(ToolCallStartEvent(index, call_id, name))
            self._out.append(ToolArgumentsEvent(index, args))
        self._region_calls += len(calls)

    # -- driver -----------------------------------------------------------------
    def _run(self, final: bool) -> None:
        if not self._names:  # nothing can be a call: pure pass-through
            self._content(self._buf)
            self._buf = ""
            return
        while True:
            before = (self._mode, len(self._buf), self._scan is not None, self._block is not None)
            step = getattr(self, "_step_" + self._mode)
            step(final)
            if (self._mode, len(self._buf), self._scan is not None, self._block is not None) == before:
                return

    def _enter_seq(self, kind: str, closer: str | None, raw: str = "") -> None:
        self._mode, self._kind, self._closer, self._raw, self._region_calls = "seq", kind, closer, raw, 0
        self._region_start = self._fed - len(self._buf)

    def _step_start(self, final: bool) -> None:
        """Only whitespace so far: a bare JSON call may still open the message."""
        s = self._buf.lstrip()
        if not s:
            if final:
                self._content(self._buf)
                self._buf = ""
            return
        if not final and any(m.startswith(s) and m != s for m in _MARKERS):
            return  # may be the start of a marker
        if s[0] in "{[" and not s.startswith(MISTRAL):
            self._content(self._buf[: len(self._buf) - len(s)])
            self._buf = s
            self._enter_seq("bare", None)
            return
        self._mode = "text"

    def _step_text(self, final: bool) -> None:
        buf = self._buf
        hits = [(buf.find(m), m) for m in _MARKERS]
        hits = [(i, m) for i, m in hits if i >= 0]
        if hits:
            i, marker = min(hits)
            self._content(buf[:i])
            self._buf = buf[i + len(marker) :]
            if marker == TAG_OPEN:
                self._enter_seq("tag", TAG_CLOSE)
            elif marker == DS_CALLS_BEGIN:
                self._enter_seq("deepseek", DS_CALLS_END)
            elif marker == FENCE:
                self._mode = "fence_info"
            elif marker == FUNCTOOLS:
                self._buf = "[" + self._buf  # the array is the call list; the word is the marker
                self._enter_seq("line", None, raw=FUNCTOOLS[:-1])
            else:
                self._enter_seq("line", None)
            return
        # Held back: what may start markup; cut by max_tokens, it is dropped, never released.
        keep = _partial_marker_len(buf, _MARKERS) if not final or self._length else 0
        self._dropped = self._dropped or (final and keep > 0)
        self._content(buf[: len(buf) - keep])
        self._buf = "" if final else buf[len(buf) - keep :]

    def _step_fence_info(self, final: bool) -> None:
        buf = self._buf
        nl = buf.find("\n")
        info = buf if nl < 0 else buf[:nl]
        lang = info.strip().lower()
        json_fence = nl >= 0 and lang in _JSON_LANGS
        could_be = any(x.startswith(lang) for x in _JSON_LANGS) and FENCE not in info
        if final and self._length and could_be and not json_fence:
            self._buf, self._mode, self._dropped = "", "text", True  # cut inside what may open a call's fence
        elif json_fence:
            self._buf = buf[nl + 1 :]
            self._enter_seq("fence", FENCE, raw=FENCE + info + "\n")
        elif not could_be or final:
            self._content(FENCE)  # code, not a call: the whole block is content
            self._mode = "fence_raw"
        # else: wait for the rest of the info line

    def _step_fence_raw(self, final: bool) -> None:
        buf = self._buf
        i = buf.find(FENCE)
        if i >= 0:
            self._content(buf[: i + len(FENCE)])
            self._buf = buf[i + len(FENCE) :]
            self._mode = "text"
            return
        keep = 0 if final else _partial_marker_len(buf, (FENCE,))
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]

    def _step_tag_text(self, final: bool) -> None:
        """Inside a markup block that held no (more) calls: text is content, the closer is dropped."""
        assert self._closer is not None
        buf = self._buf
        i = buf.find(self._closer)
        if i >= 0:
            self._content(buf[:i])
            self._buf = buf[i + len(self._closer) :]
            self._mode = "text"
            return
        keep = 0 if final else _partial_marker_len(buf, (self._closer,))
        self._content(buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]

    def _step_seq(self, final: bool) -> None:
        """Between/inside JSON values (or delimited calls) of a call region."""
        if self._block is not None:
            self._step_block(final)
            return
        if self._scan is not None:
            status, used = self._scan.feed(self._buf)
            self._buf = self._buf[used:]
            if status == "done":
                text = self._scan.text
                self._scan = None
                try:
                    calls = _calls_in(json.loads(text, strict=False), self._names)
                except ValueError:
                    calls = None
                if calls:
                    self._raw = ""
                    self._calls(calls)
                else:
                    self._not_a_call(text)
            elif status == "reject" or final:
                text = self._scan.text
                named = self._scan.named
                self._scan = None
                if status != "reject" and self._length and (named or self._kind == "tag"):
                    self._drop_cut_call()  # cut by max_tokens inside a call: nothing of it is content
                    return
                self._not_a_call(text)
            return
        buf = self._buf
        if not buf:
            if final:
                if self._length and self._kind in ("tag", "deepseek") and self._region_calls == 0:
                    self.cut_call = self._dropped = True  # cut right after <tool_call>
                self._end_region(closed=False)
            return
        closer = self._closer
        if closer and buf.startswith(closer):
            self._buf = buf[len(closer) :]
            self._end_region(closed=True)
            return
        block = _BLOCKS.get(self._kind)
        if block is not None:
            opener = block[0]
            if buf.startswith(opener):
                self._block, self._buf = "", buf
                return
            if opener.startswith(buf) and not final:
                return  # may be the block opener: wait
        n = _markup_len(buf)
        if n > 0:  # separators and stray markup between calls are dropped (kept while a fence is undecided)
            if self._raw:
                self._raw += buf[:n]
            self._buf = buf[n:]
            return
        if n < 0 or (closer and closer.startswith(buf)):
            if final:
                self._buf = ""  # the output ended inside markup: never content
            return  # may be markup: wait
        if buf[0] in "{[":
            self._scan = _JsonScan(self._names)
            return
        self._not_a_call("")

    def _step_block(self, final: bool) -> None:
        """Inside a delimited call: complete at its end marker (or at the end of the output)."""
        assert self._block is not None
        end = _BLOCKS[self._kind][1]
        text = self._block + self._buf
        i = text.find(end)
        if i >= 0:
            self._block, self._buf = None, text[i + len(end) :]
            self._delimited(text[: i + len(end)])
            return
        if self._kind == "tag":
            name = _xml_name(text)
            if name is not None and name not in self._names:  # no offered tool: content at once
                self._block, self._buf = None, ""
                self._not_a_call(text)
                return
        if not final:
            self._block, self._buf = text, ""
            return
        self._block, self._buf = None, ""
        if self._length:
            self._drop_cut_call()  # cut by max_tokens inside a call: nothing of it is content
        else:
            self._delimited(text)  # the model stopped without the end marker: take what is there

    def _delimited(self, block: str) -> None:
        call = _xml_call(block, self._schemas) if self._kind == "tag" else _deepseek_call(block, self._names)
        if call is None:
            self._not_a_call(block)
        else:
            self._calls([call])

    def _not_a_call(self, text: str) -> None:
        """A value (or other text) in a call region that is not a call: it becomes content."""
        if self._kind == "fence" and self._region_calls == 0:
            self._content(self._raw + text)  # an ordinary JSON code block
            self._raw = ""
            self._mode = "fence_raw"
        elif self._kind in ("tag", "fence", "deepseek"):
            self._content(text)
            self._mode = "tag_text"
        else:
            self._content(self._raw + text if self._region_calls == 0 else text)  # `functools` was words
            self._raw = ""
            self._mode = "text"

    def _drop_cut_call(self) -> None:
        self.cut_call = self._dropped = True
        self._raw = ""
        self._mode = "text"

    def _end_region(self, closed: bool) -> None:
        if self._kind == "fence" and self._region_calls == 0:
            if self._length and not closed:
                self._dropped = True  # cut right after an opening json fence: markup, not content
            else:
                self._content(self._raw + (FENCE if closed else ""))
        self._raw = ""
        self._mode = "text"


def collect(events: list[ParserEvent]) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) from a parser's events."""
    content: list[str] = []
    calls: list[ToolCall] = []
    for ev in events:
        if isinstance(ev, ContentEvent):
            content.append(ev.text)
        elif isinstance(ev, ToolCallStartEvent):
            calls.append(ToolCall(ev.id, ev.name, ""))
        else:
            calls[ev.index].arguments += ev.fragment
    joined = "".join(content)
    return (joined if joined else None), calls


def parse_tool_calls(text: str, tools: list[dict[str, Any]], length: bool = False) -> tuple[str | None, list[ToolCall]]:
    """(content or None, calls) for a whole completion; same decisions as the streaming parser.
    `length`: the completion was cut by max_tokens (see ToolCallStreamParser.finish)."""
    parser = ToolCallStreamParser(tools)
    return collect(parser.feed(text) + parser.finish(length))
