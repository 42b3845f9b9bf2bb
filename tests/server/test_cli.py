"""The command line: help, argument errors, and start-up failures as one clear line."""

from __future__ import annotations

import subprocess
import sys
import time

from dashchat.openai_server import build_parser

CLI = [sys.executable, "-m", "dashchat.openai_server"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], check=False, capture_output=True, text=True, timeout=timeout)


def test_help_explains_every_flag() -> None:
    parser = build_parser()
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 10, action.option_strings
    out = run("--help").stdout
    for flag in ("--model-path", "--use-modelscope", "--device", "--device-list", "--host", "--port",
                 "--served-model-name", "--api-key", "--chat-template", "--dtype", "--max-model-len",
                 "--max-num-seqs", "--log-level", "--engine", "--max-queue", "--request-timeout",
                 "--max-request-bytes", "--allowed-origins", "--shutdown-grace", "--reasoning-parser",
                 "--default-chat-template-kwargs"):
        assert flag in out


def test_defaults_match_the_seed() -> None:
    args = build_parser().parse_args([])
    assert (args.host, args.port, args.model_path, args.engine) == ("127.0.0.1", 8000, None, "native")


def test_device_list_and_distributed_flag_errors_are_clear() -> None:
    r = run("--device-list", "0,x")
    assert r.returncode == 2 and "device ids are integers" in r.stderr
    smol = ("--model-path", "smollm2-135m-instruct", "--device", "cpu")
    for args, message in [
        (("--tensor-parallel-size", "3", "--device-list", "0", "1"), "needs 3 devices per node"),
        (("--nnodes", "2", "--device-list", "0"), "need --master-addr and --master-port"),
        (("--headless",), "a single rank"),
        (("--nnodes", "3", "--node-rank", "1", "--master-port", "29999", "--device-list", "0"), "--headless"),
    ]:
        r = run(*smol, *args)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)


def test_unreachable_hub_fails_fast_without_traceback() -> None:
    t0 = time.monotonic()
    r = run("--model-path", "no-such-org/no-such-model-xyz", timeout=120)
    assert r.returncode == 1
    assert r.stderr.startswith("dashchat: error:") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) <= 3
    assert time.monotonic() - t0 < 60


def test_bad_chat_template_argument() -> None:
    r = run("--model-path", "smollm2-135m-instruct", "--chat-template", "/no/such/file.jinja")
    assert r.returncode == 1 and "--chat-template" in r.stderr and "Traceback" not in r.stderr


def test_bad_reasoning_flags_are_one_clear_line() -> None:
    r = run("--model-path", "smollm2-135m-instruct", "--reasoning-parser", "bogus")
    assert r.returncode == 1 and "--reasoning-parser" in r.stderr and "qwen3" in r.stderr
    assert "Traceback" not in r.stderr
    for value in ("{not json", "[1, 2]"):
        r = run("--model-path", "smollm2-135m-instruct", "--default-chat-template-kwargs", value)
        assert r.returncode == 1 and "--default-chat-template-kwargs" in r.stderr and "Traceback" not in r.stderr
