"""FastAPI/pydantic validation errors -> OpenAI's 400 naming the offending field."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from dashchat.server.errors import APIError, bad_request


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
