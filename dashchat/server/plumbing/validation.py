"""FastAPI/pydantic validation errors -> OpenAI's 400 naming the offending field; and the values a
valid JSON body can carry that nothing behind it can hold (checked once, for every route)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from dashchat.server.plumbing.errors import APIError, bad_request


def param_path(loc: Sequence[Any]) -> str | None:
    """("body", "messages", 0, "role") -> "messages[0].role".

    Pydantic adds union-member tags to the location ("list[str]", "NamedToolChoice",
    "literal['none','auto']"); they are not fields, so they are dropped.
    """
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and part.isidentifier() and not part[0].isupper() and part not in (
            "str", "int", "float", "bool", "list", "dict", "function-after", "function-before",
        ):
            out += f".{part}" if out else part
    return out or None


def from_validation_errors(errors: Sequence[dict[str, Any]]) -> APIError:
    if not errors:
        return bad_request("Invalid request.")
    err = errors[0]
    kind = err.get("type", "")
    loc = err.get("loc", ())
    if kind == "json_invalid":
        return bad_request(
            "We could not parse the JSON body of your request: "
            f"{err.get('ctx', {}).get('error', 'invalid JSON')}. Send a valid JSON object.",
            None, "invalid_json",
        )
    param = param_path(loc)
    if param is None:
        if kind == "missing":
            return bad_request("The request body is missing; send a JSON object.", None)
        return bad_request(f"The request body must be a JSON object ({err.get('msg', 'invalid')}).", None)
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param)
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param)
    # A union (e.g. stop: str | list[str]) fails once per member: give every member's reason.
    msgs: list[str] = []
    for e in errors:
        if param_path(e.get("loc", ())) == param and e.get("msg") not in msgs:
            msgs.append(e.get("msg", "invalid value"))
    return bad_request(f"Invalid value for '{param}': {' or '.join(msgs)}.", param)


INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # what the engine's int64 tensors and generators take


def _where(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    if key.isidentifier():
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"  # ASCII-escaped: safe to echo even when odd


def _bad_text(s: str) -> bool:
    """A lone UTF-16 surrogate (JSON "\\ud800" without its pair): no UTF-8, so no tokenizer takes it."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def check_json_values(body: Any) -> APIError | None:
    """A value in a parsed JSON body that no field of any route can accept, as a 400 naming
    it: a string (value or key) holding an escape that is not valid Unicode, an integer outside int64,
    a NaN or Infinity (not JSON, though Python's parser takes them). Walked iteratively, so a
    deeply nested body cannot overflow the stack."""
    stack: list[tuple[str, Any]] = [("", body)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if _bad_text(value):
                return bad_request(f"Invalid value for '{path or 'body'}': the string holds a unicode escape that "
                                   "is not valid Unicode (a lone surrogate such as \\ud800).", path or None)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT_MIN <= value <= INT_MAX:
                return bad_request(f"Invalid value for '{path or 'body'}': integers must be between {INT_MIN} and "
                                   f"{INT_MAX}.", path or None)
        elif isinstance(value, float):
            if not math.isfinite(value):
                return bad_request(f"Invalid value for '{path or 'body'}': NaN and Infinity are not JSON numbers.",
                                   path or None)
        elif isinstance(value, dict):
            for key, item in value.items():
                if _bad_text(key):
                    return bad_request(f"Invalid key in '{path or 'body'}': it holds a unicode escape that is not "
                                       "valid Unicode (a lone surrogate such as \\ud800).", path or None)
                stack.append((_where(path, key), item))
        elif isinstance(value, list):
            stack.extend((_where(path, i), item) for i, item in enumerate(value))
    return None


def check_json_body(body: bytes, content_type: str | None) -> APIError | None:
    """check_json_values on a raw request body that FastAPI will parse as JSON. A body that does
    not parse is left to FastAPI, which answers it with its own 400 (invalid_json)."""
    if not body or (content_type is not None and "json" not in content_type.lower()):
        return None
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return check_json_values(parsed)
