"""The browser chat page: `GET /` and its assets under `/ui/`, read from the installed package.

The page is static: it talks to the server only through the public API (`/v1/models`,
`/v1/chat/completions` with `stream: true`), like any other client, so it holds no secret and is
served without auth (AuthMiddleware's public list). Everything it loads comes from `static/`:
no CDN, no external font, so it works offline. Every file goes out with the page's policy (CSP, no
framing): `/ui/index.html` is the same page as `/`, and a frame of it could be clickjacked.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
ASSET_PREFIX = "/ui"

# Defence in depth behind the page's sanitiser: even if model output slipped through as HTML, no inline
# script or event handler would run, and nothing could be fetched from anywhere but this server.
# Images may also be data: and blob: URLs: the person's own attachments, shown from the browser's store.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",  # frame-ancestors 'none' for browsers that predate it
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # the page names its assets; a new version must show after an upgrade
}


def mount_web_ui(app: FastAPI) -> None:
    """`GET /` serves the chat page; `/ui/...` its scripts, styles and vendored libraries."""
    page = (STATIC_DIR / "index.html").read_bytes()

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def chat_page() -> Response:
        return Response(page, media_type="text/html; charset=utf-8", headers=PAGE_HEADERS)

    app.mount(ASSET_PREFIX, _Assets(directory=STATIC_DIR), name="web-ui")


class _Assets(StaticFiles):
    """The page's files, each with the page's headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(PAGE_HEADERS)
        return response
