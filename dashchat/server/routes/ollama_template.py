"""The part of Ollama's Go prompt templates that /api/generate's `template` field uses in practice.

A request's `template` replaces the model's prompt format for one call, written in Go's
text/template over `.System`, `.Prompt` and `.Response` (e.g. `{{ if .System }}<|system|>
{{ .System }}{{ end }}<|user|>{{ .Prompt }}<|assistant|>`). This renders exactly that subset: the
three fields, `if`/`else`/`end` on them, `{{-`/`-}}` trimming and comments. Rendering stops at
`.Response`, where the model's answer goes. Anything else (ranges over `.Messages`, functions,
pipelines) is a 400 naming the action, never a silently different prompt.
"""

from __future__ import annotations

import re

from dashchat.server.plumbing.errors import bad_request

_ACTION = re.compile(r"\{\{(-\s)?\s*(.*?)\s*(\s-)?\}\}", re.S)
_IF = re.compile(r"if\s+(\.\w+)")
_FIELDS = (".System", ".Prompt", ".Response")


def render_go_template(template: str, system: str, prompt: str) -> str:
    values = {".System": system, ".Prompt": prompt, ".Response": ""}
    out: list[str] = []
    shown: list[bool] = []  # per open `if`: whether its current branch is rendered
    pos = 0
    trim_left = False
    for m in _ACTION.finditer(template):
        text = template[pos:m.start()]
        if trim_left:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        if all(shown):
            out.append(text)
        trim_left, pos = bool(m.group(3)), m.end()
        action = m.group(2)
        if action.startswith("/*") and action.endswith("*/"):
            continue
        if action == ".Response":
            if all(shown):
                return "".join(out)  # the answer goes here: the model writes the rest
        elif action in _FIELDS:
            if all(shown):
                out.append(values[action])
        elif (cond := _IF.fullmatch(action)) and cond.group(1) in _FIELDS:
            shown.append(bool(values[cond.group(1)]))
        elif action == "else" and shown:
            shown[-1] = not shown[-1]
        elif action == "end" and shown:
            shown.pop()
        else:
            raise bad_request(f"'template': this server renders only .System, .Prompt and .Response with "
                              f"if/else/end; it cannot render {{{{ {action[:60]} }}}}.", "template")
    if shown:
        raise bad_request("'template': an {{ if }} is never closed with {{ end }}.", "template")
    tail = template[pos:]
    out.append(tail.lstrip() if trim_left else tail)
    return "".join(out)
