"""The image URL fetcher against a real HTTP server on 127.0.0.1, and `data:` URL decoding.

The test server is on loopback, which the fetcher refuses by default: the paths that fetch list
"127.0.0.1" (or "localhost") by name *and* set allow_private_addresses, as an operator would have to.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dashchat.server.media.image_fetch import (
    ImageFetchError,
    ImageFetchPolicy,
    decode_data_url,
    fetch_image_bytes,
    parse_allowed_hosts,
)

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGP4z8DwHwAFAAH/iZk9HQAAAABJRU5ErkJggg==")
seen_headers: list[dict[str, str]] = []


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:  # quiet
        pass

    def _send(self, status: int, headers: dict[str, str], body: bytes = b"") -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        seen_headers.append({k.lower(): v for k, v in self.headers.items()})
        path = self.path
        if path == "/img.png":
            self._send(200, {"Content-Type": "image/png", "Content-Length": str(len(PNG))}, PNG)
        elif path == "/octet":
            self._send(200, {"Content-Type": "application/octet-stream", "Content-Length": str(len(PNG))}, PNG)
        elif path == "/to-img":
            self._send(302, {"Location": "/img.png", "Content-Length": "0"})
        elif path == "/away":
            self._send(302, {"Location": "http://elsewhere.example/img.png", "Content-Length": "0"})
        elif path == "/to-file":
            self._send(301, {"Location": "file:///etc/passwd", "Content-Length": "0"})
        elif path.startswith("/loop"):
            n = int(path.removeprefix("/loop") or 0)
            self._send(302, {"Location": f"/loop{n + 1}", "Content-Length": "0"})
        elif path == "/huge-declared":
            self._send(200, {"Content-Type": "image/png", "Content-Length": str(10**9)}, b"x" * 1000)
        elif path == "/huge-chunked":  # no Content-Length: only counting while reading finds out
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for _ in range(64):
                    self.wfile.write(b"1000\r\n" + b"x" * 4096 + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except OSError:
                pass  # the fetcher hung up, as it should
        elif path == "/slow":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            try:
                for _ in range(300):  # a trickle: each read succeeds, the whole never ends in time
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.05)
            except OSError:
                pass
        elif path == "/html":
            self._send(200, {"Content-Type": "text/html", "Content-Length": "5"}, b"<b>x")
        elif path == "/missing":
            self._send(404, {"Content-Type": "image/png", "Content-Length": "0"})
        else:
            self._send(500, {"Content-Length": "0"})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def loopback(**kw: object) -> ImageFetchPolicy:
    """An operator's policy that lets the fetcher reach the test server."""
    kw.setdefault("allowed_hosts", frozenset({"127.0.0.1", "localhost"}))
    kw.setdefault("allow_private_addresses", True)
    kw.setdefault("max_bytes", 64 * 1024)
    kw.setdefault("timeout_s", 5.0)
    return ImageFetchPolicy(**kw)  # type: ignore[arg-type]


def fetch(url: str, policy: ImageFetchPolicy) -> bytes:
    return asyncio.run(fetch_image_bytes(url, policy))


def refused(url: str, policy: ImageFetchPolicy) -> str:
    with pytest.raises(ImageFetchError) as info:
        fetch(url, policy)
    return str(info.value)


def test_an_allowed_image_is_fetched_without_credentials(port: int) -> None:
    seen_headers.clear()
    assert fetch(f"http://127.0.0.1:{port}/img.png", loopback()) == PNG
    assert fetch(f"http://localhost:{port}/octet", loopback()) == PNG  # by name, resolved here
    assert fetch(f"http://127.0.0.1:{port}/to-img", loopback()) == PNG  # a redirect on an allowed host
    sent = seen_headers[0]
    assert sent["host"] == f"127.0.0.1:{port}"
    assert not {"cookie", "authorization", "proxy-authorization"} & set(sent)


def test_loopback_needs_both_the_name_and_the_flag(port: int) -> None:
    url = f"http://127.0.0.1:{port}/img.png"
    assert "private" in refused(url, loopback(allow_private_addresses=False))
    assert "does not fetch images from '127.0.0.1'" in refused(url, loopback(allowed_hosts=frozenset({"localhost"})))
    # IPv4 written as IPv6 is still loopback
    mapped = ImageFetchPolicy(allowed_hosts=frozenset({"::ffff:7f00:1"}))
    assert "private" in refused(f"http://[::ffff:127.0.0.1]:{port}/img.png", mapped)
    # a wildcard never vouches for a private address, flag or not
    wild = ImageFetchPolicy(allowed_hosts=frozenset({"*.localhost"}), allow_private_addresses=True)
    assert not wild.may_reach_private("a.localhost") and wild.allows("a.localhost") and not wild.allows("localhost")
    meta = ImageFetchPolicy(allowed_hosts=frozenset({"169.254.169.254"}))
    assert "private" in refused("http://169.254.169.254/latest/meta-data/", meta)


def test_the_default_policy_fetches_nothing() -> None:
    assert "--allowed-media-domains" in refused("https://example.com/cat.png", ImageFetchPolicy())


def test_redirects_are_checked_and_bounded(port: int) -> None:
    assert "'elsewhere.example'" in refused(f"http://127.0.0.1:{port}/away", loopback())
    assert "http or https" in refused(f"http://127.0.0.1:{port}/to-file", loopback())
    assert "more than 3 times" in refused(f"http://127.0.0.1:{port}/loop", loopback(max_redirects=3))


def test_size_time_and_type_limits(port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    assert "larger than" in refused(f"{base}/huge-declared", loopback())
    assert "larger than" in refused(f"{base}/huge-chunked", loopback())
    started = time.monotonic()
    assert "longer than 0.5 s" in refused(f"{base}/slow", loopback(timeout_s=0.5))
    assert time.monotonic() - started < 5  # the trickle would take 15 s
    assert "'text/html', not an image" in refused(f"{base}/html", loopback())
    assert "HTTP 404" in refused(f"{base}/missing", loopback())


@pytest.mark.parametrize("url", [
    "ftp://127.0.0.1/x.png", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO",
    "http://user:pw@127.0.0.1/img.png", "http://user@127.0.0.1/img.png", "http:///img.png",
    "http://127.0.0.1:99999/img.png",
])
def test_urls_refused_before_connecting(url: str) -> None:
    refused(url, loopback())


def test_allowed_hosts_flag_parsing() -> None:
    assert parse_allowed_hosts(" Images.Example.com, *.cdn.example.org,,127.0.0.1, [::1] ") == frozenset(
        {"images.example.com", "*.cdn.example.org", "127.0.0.1", "::1"})
    assert parse_allowed_hosts("") == frozenset()
    for bad in ["*", "*.com", "http://example.com", "example.com:8080", "ex*ample.com", "a/b", "*.10.0.0.1"]:
        with pytest.raises(ValueError):
            parse_allowed_hosts(bad)


def test_data_urls() -> None:
    b64 = base64.b64encode(PNG).decode()
    assert decode_data_url(f"data:image/png;base64,{b64}", 1000) == ("image/png", PNG)
    assert decode_data_url(f"DATA:Image/PNG;name=x.png;base64,{b64[:20]}\n{b64[20:]}", 1000) == ("image/png", PNG)
    for bad, why in [
        (f"data:image/png,{b64}", "base64"),
        (f"data:text/html;base64,{b64}", "not an image"),
        (f"data:;base64,{b64}", "not an image"),
        ("data:image/png;base64,@@@@", "malformed"),
        ("data:image/png;base64,abc", "malformed"),  # bad padding
        ("data:image/png;base64,", "no data"),
        ("data:image/png;base64", "','"),
        (f"data:image/png;base64,{b64}", "larger than 10 bytes"),
        ("http://example.com/x.png", "not a data: URL"),
    ]:
        with pytest.raises(ImageFetchError, match=why):
            decode_data_url(bad, 10 if "larger" in why else 1000)


def test_cli_flags_make_the_policy(capsys: pytest.CaptureFixture[str]) -> None:
    from dashchat.openai_server import _image_fetch_policy, build_parser, main

    args = build_parser().parse_args(["--allowed-media-domains", "img.example.com,*.cdn.example.org",
                                      "--media-fetch-timeout", "2.5", "--media-max-bytes", "1000",
                                      "--allow-private-media-addresses"])
    assert _image_fetch_policy(args) == ImageFetchPolicy(
        allowed_hosts=frozenset({"img.example.com", "*.cdn.example.org"}), max_bytes=1000, timeout_s=2.5,
        allow_private_addresses=True)
    assert _image_fetch_policy(build_parser().parse_args([])) == ImageFetchPolicy()
    with pytest.raises(SystemExit) as exit_info:  # before any model is loaded
        main(["--allowed-media-domains", "http://example.com"])
    assert exit_info.value.code == 2 and "--allowed-media-domains" in capsys.readouterr().err


def test_the_checked_address_is_the_one_connected_to(port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS rebinding: a name that answers a public address to the check and loopback a moment later. The
    fetcher resolves once per hop and connects to what it checked, so the second answer is never used."""
    answers = iter(["93.184.216.34", "127.0.0.1", "127.0.0.1"])
    asked: list[str] = []

    def rebinding(host: str, *args: object, **kw: object) -> list[tuple[object, ...]]:
        asked.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    seen_headers.clear()
    policy = ImageFetchPolicy(allowed_hosts=frozenset({"rebind.test"}), timeout_s=1.0)
    with pytest.raises(ImageFetchError):  # the public address is not reachable from the test machine
        fetch(f"http://rebind.test:{port}/img.png", policy)
    assert asked == ["rebind.test"] and seen_headers == []  # loopback never got the request
