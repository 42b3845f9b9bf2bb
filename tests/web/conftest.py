"""Browser tests of the chat page: Debian's chromium driven by Playwright, against real servers.

Playwright is used with `executable_path` (the system chromium that scripts/setup.sh installs);
Playwright's own browser download is never used. Without playwright or chromium the browser tests
skip and say why. Screenshots go to tests/web/screenshots/ (gitignored).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# The real-server helpers are shared with tests/server (as tests/server/conftest.py uses them).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_proc import SMOLLM_ARGS, ServerProcess, running  # noqa: E402

SCREENSHOTS = Path(__file__).parent / "screenshots"
API_KEY = "sk-web-test-key"


def chromium_path() -> str | None:
    return os.environ.get("DASHCHAT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install -e '.[test]'; scripts/setup.sh does it)"
    if chromium_path() is None:
        return "Debian's chromium is not installed (apt-get install chromium; scripts/setup.sh does it as root)"
    return None


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    # As root (CI, containers) chromium refuses to start with its sandbox.
    args = ["--no-sandbox"] if os.geteuid() == 0 else []
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=args)
        yield b
        b.close()


class PageErrors:
    """Uncaught page errors, CSP violations and dialogs: a test fails on any (model output that ran script)."""

    def __init__(self, page: Any) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", self._console)
        page.on("dialog", self._dialog)

    def _console(self, message: Any) -> None:
        # The page's own code must never trip its Content-Security-Policy (an inline style, say).
        if "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()


def new_page(browser: Any, base_url: str, **context: Any) -> Any:
    """A fresh browser profile (empty localStorage) on the chat page, once it has loaded the models."""
    context.setdefault("viewport", {"width": 1200, "height": 820})
    ctx = browser.new_context(reduced_motion="reduce", accept_downloads=True, **context)
    ctx.set_default_timeout(60_000)
    page = ctx.new_page()
    page.errors = PageErrors(page)
    page.goto(base_url + "/")
    page.wait_for_selector("body[data-ready='1']")
    return page


@pytest.fixture()
def page_factory(browser: Any) -> Iterator[Any]:
    pages: list[Any] = []

    def make(base_url: str, **context: Any) -> Any:
        page = new_page(browser, base_url, **context)
        pages.append(page)
        return page

    yield make
    for page in pages:
        assert page.errors.errors == [], f"uncaught errors in the page: {page.errors.errors}"
        assert page.errors.dialogs == [], f"the page opened dialogs: {page.errors.dialogs}"
        page.context.close()


def screenshot(page: Any, name: str) -> Path:
    SCREENSHOTS.mkdir(exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# Module scope: each server stops when its tests are done, not at the end of the whole suite.
@pytest.fixture(scope="module")
def web_server() -> Iterator[ServerProcess]:
    """SmolLM2 on the CPU with a small context, as a person would start it for the page. Float32
    weights (--quantization none): the page's answer is compared with the API's for the same greedy
    request, and with GGUF blocks a cold prompt and a prefix-cache hit may still part on a near-tie
    (their float sums differ in order: 8-row and per-row kernel tiles)."""
    yield from running(*SMOLLM_ARGS, "--max-model-len", "1024", "--max-num-seqs", "4", "--quantization", "none")


@pytest.fixture(scope="module")
def keyed_server() -> Iterator[ServerProcess]:
    """With --api-key; one sequence at a time and a queue of one, so a third request gets 429."""
    yield from running(*SMOLLM_ARGS, "--max-model-len", "1024", "--api-key", API_KEY,
                       "--max-num-seqs", "1", "--max-queue", "1")


@pytest.fixture(scope="module")
def model_name(web_server: ServerProcess) -> str:
    return str(httpx.get(f"{web_server.base_url}/v1/models").json()["data"][0]["id"])
