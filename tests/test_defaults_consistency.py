"""Defaults live in one place each and the others are checked against them: the CLI's argparse
defaults must build exactly EngineArgs' and ServerConfig's defaults, and `--help` and the README's
flag table must state the same values. Also: every repository file that a doc or docstring names exists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from dashchat.engine.args import EngineArgs
from dashchat.engine.native import llm_engine
from dashchat.openai_server import _build_engine, _device_ids, _engine_args, build_parser
from dashchat.server.config import ServerConfig

REPO = Path(__file__).resolve().parents[1]
PARSER = build_parser()
OPTIONS = {a.option_strings[0]: a for a in PARSER._actions if a.option_strings and a.dest != "help"}
# CLI flag dest -> ServerConfig field, as openai_server.main() builds the config.
SERVER_FIELDS = {"max_request_bytes": "max_request_bytes", "max_messages": "max_messages", "max_tools": "max_tools",
                 "max_n": "max_n", "request_timeout": "request_timeout_s", "shutdown_grace": "shutdown_grace_s",
                 "log_prompts": "log_prompts", "enable_docs": "enable_docs",
                 "allow_special_tokens_in_content": "allow_special_tokens_in_content",
                 "grammar_compile_timeout": "grammar_compile_timeout_s",
                 "grammar_compile_threads": "grammar_compile_threads"}


def test_cli_defaults_build_the_engine_args_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[EngineArgs] = []
    monkeypatch.setattr(llm_engine.AsyncLLMEngine, "from_args", classmethod(lambda cls, a: built.append(a)))
    args = PARSER.parse_args(["--device", "cpu"])
    args.device_ids = _device_ids(args.device_list)
    _build_engine(args, _engine_args(args, "/model"))
    assert dataclasses.asdict(built[0]) == dataclasses.asdict(EngineArgs(model_dir="/model", device="cpu"))


def test_cli_defaults_are_the_server_config_defaults() -> None:
    args = PARSER.parse_args([])
    defaults = ServerConfig(served_model_names=["m"])
    for dest, field in SERVER_FIELDS.items():
        assert getattr(args, dest) == getattr(defaults, field), dest


def _readme_flags() -> dict[str, str]:
    """Flag -> its README 'Default' cell (rows naming several flags split their cell at ', ')."""
    out: dict[str, str] = {}
    for line in (REPO / "README.md").read_text().splitlines():
        if not line.startswith("| `--"):
            continue
        cells = [c.strip() for c in line.replace("\\|", "/").strip().strip("|").split("|")]  # \| inside a cell
        flags = re.findall(r"`(--[a-z-]+)", cells[0])
        values = cells[1].split(", ") if len(flags) > 1 else [cells[1]]
        assert len(values) == len(flags), f"README row {line!r}: one default per flag"
        out.update(zip(flags, values))
    return out


def _as_readme(value: Any, action: Any) -> str | None:
    """How the README writes an argparse default; None: no literal value (it describes it instead)."""
    if (action.const is True and value is False) or (action.const is False and value is True):
        return "off"  # a switch not given (store_true, or a --no-… store_false)
    if value is None:
        return None
    if isinstance(value, list):
        return " ".join(map(str, value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def test_readme_flag_table_matches_the_cli() -> None:
    readme = _readme_flags()
    assert set(OPTIONS) <= set(readme), f"flags missing from the README table: {sorted(set(OPTIONS) - set(readme))}"
    assert set(readme) <= set(OPTIONS), f"README documents unknown flags: {sorted(set(readme) - set(OPTIONS))}"
    for flag, action in OPTIONS.items():
        cell = readme[flag]
        expected = _as_readme(action.default, action)
        if cell.endswith(" MiB"):  # byte counts are written in MiB
            n, unit = cell.split()
            assert unit == "MiB" and int(n) * 2**20 == action.default
        elif expected is None:
            assert cell, f"{flag}: the README must say what the default is"
        else:
            assert cell == expected, f"{flag}: README says {cell!r}, the CLI {expected!r}"


def test_help_and_readme_state_the_engine_built_in_defaults() -> None:
    help_text = " ".join(PARSER.format_help().split())
    readme = _readme_flags()
    steps = llm_engine._DEFAULT_STEP_TOKENS
    assert f"Default: {steps['cpu']} on CPU, {steps['cuda']} on CUDA" in help_text
    assert readme["--max-num-batched-tokens"] == f"{steps['cpu']} CPU, {steps['cuda']} CUDA"
    assert f"Default: the model's, at most {llm_engine._MAX_DEFAULT_LEN}." in help_text
    assert readme["--max-model-len"] == f"model's, at most {llm_engine._MAX_DEFAULT_LEN}"
    assert f"default: {EngineArgs.max_num_seqs})" in help_text  # ArgumentDefaultsHelpFormatter's own line


def test_files_named_in_docs_and_docstrings_exist() -> None:
    pattern = re.compile(r"\b(?:tests|dashchat|bench|scripts|docs)/[A-Za-z0-9_/.-]+\.(?:py|md|sh|c)\b")
    sources = [REPO / "README.md", *(REPO / "docs").glob("*.md")]
    for folder in ("dashchat", "tests", "bench", "scripts"):
        # not the hidden build folders the benches make (bench/.venv-llamacpp, bench/.llama-server)
        sources += [p for p in (REPO / folder).rglob("*") if p.suffix in (".py", ".sh") and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(REPO).parts)]
    missing = {(str(src.relative_to(REPO)), name) for src in sources
               for name in pattern.findall(src.read_text(errors="replace")) if not (REPO / name).exists()}
    assert not missing, sorted(missing)
