"""What a chat request says about tools: new-style `tools`/`tool_choice` or legacy
`functions`/`function_call`, normalized to one form and checked against each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dashchat.server.config import ServerConfig
from dashchat.server.plumbing.errors import bad_request
from dashchat.server.protocol import ChatCompletionRequest, ChatMessage


@dataclass
class ToolPlan:
    tools: list[dict[str, Any]]  # OpenAI tool dicts, for the template and the parser; [] when unused
    mode: str  # "none" | "auto" | "required" | "named"
    named: str | None = None
    parallel: bool = True
    legacy: bool = False  # answer with message.function_call / finish_reason "function_call"

    @property
    def parse(self) -> bool:
        return bool(self.tools) and self.mode != "none"

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "named")

    def forced_tools(self) -> list[dict[str, Any]]:
        if self.mode == "named":
            return [t for t in self.tools if t["function"]["name"] == self.named]
        return self.tools


def check_tool_messages(messages: list[ChatMessage]) -> None:
    """OpenAI's order rule: a `tool` message answers a call of the assistant message with `tool_calls`
    right before it (its other results may come between); one that answers nothing is a 400, not a prompt."""
    open_calls: set[str] | None = None  # ids of the calls awaiting results; None: no call to answer
    for i, m in enumerate(messages):
        if m.role == "tool":
            if open_calls is None:
                raise bad_request(f"Invalid parameter: messages[{i}] has role 'tool' but answers no call; a 'tool' "
                                  "message must follow an assistant message with 'tool_calls'.", f"messages[{i}].role")
            if open_calls and m.tool_call_id is not None and m.tool_call_id not in open_calls:
                raise bad_request(f"Invalid parameter: the 'tool_call_id' of messages[{i}] is not among the "
                                  "'tool_calls' of the assistant message before it.", f"messages[{i}].tool_call_id")
        elif m.role == "assistant" and m.tool_calls:
            open_calls = {c.id for c in m.tool_calls if c.id}
        else:
            open_calls = None


def plan_tools(req: ChatCompletionRequest, cfg: ServerConfig) -> ToolPlan:
    check_tool_messages(req.messages)  # tool results are part of what a request says about tools
    if req.functions is not None and req.tools is not None:
        raise bad_request("Use either 'tools' or the legacy 'functions', not both.", "functions")
    legacy = req.functions is not None or (req.tools is None and req.function_call is not None)
    if legacy:
        defs = [f.model_dump(exclude_none=True) for f in req.functions or []]
        tools = [{"type": "function", "function": d} for d in defs]
        choice: Any = req.function_call
        param, list_param = "function_call", "functions"
        parallel = False
    else:
        tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
        choice = req.tool_choice
        param, list_param = "tool_choice", "tools"
        parallel = req.parallel_tool_calls is not False

    if len(tools) > cfg.max_tools:
        raise bad_request(f"'{list_param}' takes at most {cfg.max_tools} entries.", list_param)
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request(f"Function names in '{list_param}' must be unique.", list_param)
    if choice is not None and not tools:
        raise bad_request(f"'{param}' is only allowed when '{list_param}' are specified.", param)
    if tools:
        _validate(tools, list_param)

    if choice is None:
        return ToolPlan(tools, "auto" if tools else "none", parallel=parallel, legacy=legacy)
    if isinstance(choice, str):
        return ToolPlan(tools, choice, parallel=parallel, legacy=legacy)
    name = choice.function.name if hasattr(choice, "function") else choice.name
    if name not in names:
        raise bad_request(f"Invalid value for '{param}': no function named '{name}' in '{list_param}'.", param)
    return ToolPlan(tools, "named", named=name, parallel=False, legacy=legacy)


def _validate(tools: list[dict[str, Any]], param: str) -> None:
    try:
        from dashchat.server.text.grammar import validate_tools
    except ImportError:
        return
    try:
        validate_tools(tools)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
