"""Fetching the images that chat requests point at, without becoming a way into the server's network.

A request's `image_url` is chosen by the client, and the server fetches it: without rules that is a
server-side request forgery (SSRF) hole -- `http://169.254.169.254/` (cloud credentials), `http://localhost:6379/`,
an intranet page. So a fetch is refused unless every step passes:

1. the URL is http or https, with no `user:password@` part;
2. its host is on the operator's allow-list (exact names, or `*.example.com` for the subdomains of one);
3. the host resolves only to public addresses -- private, loopback, link-local, multicast and reserved ones
   are refused unless the operator listed that host by its exact name *and* allowed private addresses;
4. the connection goes to the very address that was checked (the host name is resolved once, so a DNS
   answer that changes between check and connect cannot redirect it); TLS still verifies the certificate
   for the host name;
5. redirects are followed by hand, each target through steps 1-4, at most `max_redirects` of them;
6. the answer is 200 with an `image/*` (or `application/octet-stream`) content type, and at most `max_bytes`
   long: a larger Content-Length is refused before reading, a longer body is cut off while streaming;
7. the whole fetch (resolving, connecting, every redirect, the body) ends within `timeout_s`.

No cookies and no credentials are sent: each request carries only Host, User-Agent and Accept. The HTTP/1.1
exchange is h11 over an asyncio connection (h11 comes with uvicorn), which keeps the connect-to-this-address
rule plain code instead of a client library's internals.

Every refusal is an `ImageFetchError` whose message can go back to the client as is: it names what the
client sent, never an address the server resolved or an exception's text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import h11

USER_AGENT = "dashchat-image-fetch"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_READ_SIZE = 64 * 1024
_IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ImageFetchError(ValueError):
    """An image URL that cannot be used; the message is safe to show the client."""


@dataclass(frozen=True)
class ImageFetchPolicy:
    """What the operator lets the server fetch. The default fetches nothing remote."""

    allowed_hosts: frozenset[str] = frozenset()  # "images.example.com", "*.example.com" (subdomains only)
    max_bytes: int = 20 * 1024 * 1024
    timeout_s: float = 10.0
    max_redirects: int = 3
    # Private/loopback/link-local addresses, for hosts listed by their exact name only.
    allow_private_addresses: bool = False

    def allows(self, host: str) -> bool:
        if host in self.allowed_hosts:
            return True
        return any(p.startswith("*.") and host.endswith(p[1:]) for p in self.allowed_hosts)

    def may_reach_private(self, host: str) -> bool:
        # A wildcard entry is too broad to vouch for internal addresses: one of its subdomains may be
        # under someone else's control (a user's page on a hosting service, say).
        return self.allow_private_addresses and host in self.allowed_hosts


def normalize_host(host: str) -> str:
    """The form hosts are compared in: lower case, no trailing dot, IDNA for names, compressed for IPs."""
    host = host.strip().rstrip(".").lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError:
        raise ImageFetchError(f"'{host}' is not a valid host name") from None


def parse_allowed_hosts(text: str) -> frozenset[str]:
    """`--allowed-media-domains`: a comma list of host names, IP addresses or `*.suffix` patterns."""
    out = set()
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        wildcard = entry.startswith("*.")
        name = entry[2:] if wildcard else entry
        try:
            host = normalize_host(name)
        except ImageFetchError as exc:
            raise ValueError(f"{entry!r}: {exc}") from None
        is_ip = _ip_or_none(host) is not None
        if not host or (wildcard and (is_ip or "." not in host and host != "localhost")):
            raise ValueError(f"{entry!r}: a pattern is '*.' and a domain, like '*.example.com'")
        if not is_ip and not all(label and all(c.isalnum() or c == "-" for c in label)
                                 for label in host.split(".")):
            raise ValueError(f"{entry!r}: a host name only (no scheme, port, path or '*' inside)")
        out.add(f"*.{host}" if wildcard else host)
    return frozenset(out)


def _ip_or_none(host: str) -> _IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _is_public(ip: _IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not (ip.is_multicast or ip.is_reserved)


# ---- data: URLs -----------------------------------------------------------------------------------

def decode_data_url(url: str, max_bytes: int) -> tuple[str, bytes]:
    """`data:image/png;base64,...` -> ("image/png", the bytes). Only base64 data of an image type."""
    if not url[:5].lower() == "data:":
        raise ImageFetchError("not a data: URL")
    head, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageFetchError("a data: URL needs a ',' before its data")
    params = [p.strip() for p in head.split(";")]
    if params[-1].lower() != "base64":
        raise ImageFetchError("a data: URL for an image must be base64 (';base64,')")
    mime = params[0].lower() or "text/plain"
    if not _is_image_type(mime):
        raise ImageFetchError(f"a data: URL of type '{mime}' is not an image")
    payload = "".join(payload.split())  # line breaks some encoders insert
    if len(payload) // 4 * 3 > max_bytes + 2:
        raise ImageFetchError(f"the image is larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageFetchError("the data: URL's base64 is malformed") from None
    if not data:
        raise ImageFetchError("the data: URL holds no data")
    if len(data) > max_bytes:
        raise ImageFetchError(f"the image is larger than {max_bytes} bytes")
    return mime, data


def _is_image_type(mime: str) -> bool:
    return mime.startswith("image/") or mime == "application/octet-stream"


# ---- http(s) URLs ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # normalized
    port: int
    path: str  # path and query, as sent in the request line

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == (443 if self.scheme == "https" else 80) else f"{host}:{self.port}"


async def fetch_image_bytes(url: str, policy: ImageFetchPolicy) -> bytes:
    """The image at `url` (http/https), fetched under `policy`; ImageFetchError for any refusal."""
    try:
        return await asyncio.wait_for(_fetch(url, policy), timeout=policy.timeout_s)
    except asyncio.TimeoutError:
        raise ImageFetchError(f"fetching the image took longer than {policy.timeout_s:g} s") from None


async def _fetch(url: str, policy: ImageFetchPolicy) -> bytes:
    for _ in range(policy.max_redirects + 1):
        target = _checked_target(url, policy)
        addresses = await _checked_addresses(target, policy)
        location = await _get(target, addresses, policy)
        if isinstance(location, bytes):
            return location
        url = urljoin(url, location)
    raise ImageFetchError(f"the image URL redirected more than {policy.max_redirects} times")


def _checked_target(url: str, policy: ImageFetchPolicy) -> _Target:
    """Steps 1 and 2: scheme, no credentials, a listed host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ImageFetchError("the image URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ImageFetchError(f"image URLs must be http or https, not '{scheme or url[:16]}'")
    if "@" in parts.netloc:
        raise ImageFetchError("image URLs with a user name or password are not fetched")
    if not parts.hostname:
        raise ImageFetchError("the image URL has no host")
    host = normalize_host(parts.hostname)
    if not policy.allows(host):
        raise ImageFetchError(f"the server does not fetch images from '{host}' "
                              "(the operator lists allowed hosts with --allowed-media-domains)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(scheme, host, port or (443 if scheme == "https" else 80), path)


async def _checked_addresses(target: _Target, policy: ImageFetchPolicy) -> list[str]:
    """Step 3: the addresses to connect to, each of them checked."""
    literal = _ip_or_none(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port,
                                                                 type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise ImageFetchError(f"the image host '{target.host}' cannot be resolved") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        if not addresses:
            raise ImageFetchError(f"the image host '{target.host}' cannot be resolved")
    # One private address among public ones is enough to refuse: which one a connect would use is not ours
    # to predict, and a host that mixes them is not one to trust.
    if not all(_is_public(a) for a in addresses) and not policy.may_reach_private(target.host):
        raise ImageFetchError(f"the image host '{target.host}' is on a private or reserved network")
    return [str(a) for a in addresses]


async def _get(target: _Target, addresses: list[str], policy: ImageFetchPolicy) -> bytes | str:
    """Steps 4 and 6: one GET to the first of `addresses` that takes the connection. The body, or a
    redirect's Location to check and follow."""
    reader, writer = await _connect(target, addresses)
    try:
        return await _exchange(reader, writer, target, policy)
    except h11.ProtocolError:
        raise ImageFetchError(f"'{target.host}' answered with malformed HTTP") from None
    except (OSError, ssl.SSLError):
        raise ImageFetchError(f"the connection to '{target.host}' failed") from None
    finally:
        writer.close()


async def _connect(target: _Target, addresses: list[str]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # In order, as a browser would (`localhost` may list ::1 first and serve on 127.0.0.1 only).
    tls = ssl.create_default_context() if target.scheme == "https" else None
    for address in addresses:
        try:
            return await asyncio.open_connection(address, target.port, ssl=tls,
                                                 server_hostname=target.host if tls else None)
        except ssl.SSLError:
            raise ImageFetchError(f"the image host '{target.host}' failed the TLS check") from None
        except OSError:
            continue
    raise ImageFetchError(f"the image host '{target.host}' cannot be reached")


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, target: _Target,
                    policy: ImageFetchPolicy) -> bytes | str:
    conn = h11.Connection(our_role=h11.CLIENT)
    request = h11.Request(method="GET", target=target.path, headers=[
        ("Host", target.host_header), ("User-Agent", USER_AGENT), ("Accept", "image/*"),
        ("Connection", "close")])
    writer.write(conn.send(request) + conn.send(h11.EndOfMessage()))
    await writer.drain()

    async def next_event() -> h11.Event:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            conn.receive_data(await reader.read(_READ_SIZE))  # b"" at EOF, which h11 understands

    response = await next_event()
    while isinstance(response, h11.InformationalResponse):  # 100 Continue and the like
        response = await next_event()
    if not isinstance(response, h11.Response):
        raise ImageFetchError(f"'{target.host}' closed the connection without an answer")
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in response.headers}
    if response.status_code in REDIRECT_STATUSES and "location" in headers:
        return headers["location"]
    if response.status_code != 200:
        raise ImageFetchError(f"the image URL answered HTTP {response.status_code}")
    mime = headers.get("content-type", "").split(";")[0].strip().lower()
    if not _is_image_type(mime):
        raise ImageFetchError(f"the image URL's content type is '{mime or 'missing'}', not an image")
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > policy.max_bytes:
        raise ImageFetchError(f"the image is larger than {policy.max_bytes} bytes")
    body = bytearray()
    while True:
        event = await next_event()
        if isinstance(event, h11.Data):
            body += event.data
            if len(body) > policy.max_bytes:
                raise ImageFetchError(f"the image is larger than {policy.max_bytes} bytes")
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise ImageFetchError(f"'{target.host}' closed the connection before the image was complete")
    if not body:
        raise ImageFetchError("the image URL's answer is empty")
    return bytes(body)
