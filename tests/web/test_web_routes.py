"""How the server serves the page: `/` and `/ui/*` from the package, open without a key, off with --no-web-ui.

In-process over the scripted engine (routing only; no browser needed), plus one real server for the flag.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from server_fakes import ScriptedEngine
from server_proc import SMOLLM_ARGS, ServerProcess
from starlette.testclient import TestClient

from dashchat.server.app import build_app
from dashchat.server.config import ServerConfig
from dashchat.server.web import STATIC_DIR

_stack = ExitStack()


def client(**cfg: Any) -> TestClient:
    cfg.setdefault("served_model_names", ["m"])
    return _stack.enter_context(TestClient(build_app(ScriptedEngine(), ServerConfig(**cfg))))


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    _stack.close()


def test_root_serves_the_page_with_a_strict_policy() -> None:
    r = client().get("/")
    assert r.status_code == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert "<title>dashchat</title>" in r.text
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "connect-src 'self'" in csp and "unsafe-inline" not in csp
    assert "img-src 'self' data: blob:;" in csp  # attached images, from the browser's own store
    assert r.headers["x-content-type-options"] == "nosniff"
    assert client().head("/").status_code == 200


def test_every_asset_the_page_names_is_served_from_the_package() -> None:
    c = client()
    page = c.get("/").text
    names = re.findall(r'(?:src|href)="(/ui/[^"]+)"', page)
    assert {"/ui/app.js", "/ui/style.css", "/ui/vendor/marked.umd.js", "/ui/vendor/purify.min.js",
            "/ui/vendor/highlight.min.js"} <= set(names)
    for name in names:
        r = c.get(name)
        assert r.status_code == 200 and r.content == (STATIC_DIR / name.removeprefix("/ui/")).read_bytes(), name
    assert c.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
    # the modules app.js imports
    for module in ("api.js", "render.js", "store.js", "images.js"):
        assert c.get(f"/ui/{module}").status_code == 200


def test_page_fetches_nothing_from_elsewhere() -> None:
    for path in STATIC_DIR.glob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", text), path
            assert "@import" not in text and "fonts.googleapis" not in text, path


def test_unknown_assets_and_escapes_are_json_404s() -> None:
    c = client()
    for path in ("/ui/nope.js", "/ui/../__init__.py", "/ui/%2e%2e/__init__.py", "/nothing"):
        r = c.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error", path


def test_page_loads_without_a_key_but_the_api_does_not() -> None:
    c = client(api_keys=["k"])
    assert c.get("/").status_code == 200
    assert c.get("/ui/app.js").status_code == 200
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200


def test_web_ui_off_in_config() -> None:
    c = client(web_ui=False)
    assert c.get("/").status_code == 404 and c.get("/ui/app.js").status_code == 404
    assert c.get("/health").status_code == 200


def test_no_web_ui_flag_on_the_real_server() -> None:
    srv = ServerProcess(*SMOLLM_ARGS, "--max-model-len", "256", "--no-web-ui")
    try:
        srv.wait_ready()
        r = httpx.get(srv.base_url + "/")
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
        assert httpx.get(srv.base_url + "/ui/app.js").status_code == 404
        assert httpx.get(srv.base_url + "/v1/models").status_code == 200
    finally:
        srv.stop()


def test_every_page_file_carries_the_policy_and_refuses_framing() -> None:
    """`/ui/index.html` is the page itself: without the CSP it could run injected markup, framed it
    could be clickjacked. Every file under /ui gets the same headers as `/`."""
    c = client()
    for path in ("/", "/ui/index.html", "/ui/app.js", "/ui/store.js", "/ui/style.css", "/ui/vendor/purify.min.js"):
        r = c.get(path)
        assert r.status_code == 200, path
        assert "frame-ancestors 'none'" in r.headers["content-security-policy"], path
        assert "script-src 'self'" in r.headers["content-security-policy"], path
        assert r.headers["x-frame-options"] == "DENY", path
