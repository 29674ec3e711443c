"""What a browser and the wire make of the relay's answers: the yardsticks of the security tests
(tests/test_security_*.py, tests/conformance/test_security.py, docs/security.md).

* Where a browser goes with a ``Location``: the WHATWG URL standard, through ``ada-url`` (the
  parser Node.js uses; Chromium follows the same standard), not a parser of our own: the open
  redirects it catches (``/\\t/evil.example``, ``/\\\\evil.example``) are exactly the ones a
  hand-written rule misses.
* Which cookie a browser stores from a ``Set-Cookie``: RFC 6265bis section 5.6 (the algorithm
  Chromium and Firefox implement: whitespace around the name is dropped, a pair without ``=`` is a
  cookie with an empty name, whose ``Cookie`` header form is its bare value). Written out here
  because no Python library parses the way browsers do (``http.cookies`` is RFC 2109 and rejects
  what browsers accept).
* Frames of the tunnel protocol built from docs/protocol.md sections 3-4 (not from the relay's own
  code, which is moving), for the tests that play a bridge: HELLO and STATS.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from dataclasses import dataclass, field

from ada_url import URL, join_url

#: The relay's own cookies: the login session and the sticky node.
RELAY_COOKIES = ("bridge_session", "bridge_node")


# ------------------------------------------------------------------------------------ URLs
def browser_target(base: str, location: str) -> str | None:
    """The URL a browser at ``base`` goes to when told ``Location: location`` (None: the browser
    refuses it as an invalid URL, which is not a redirect elsewhere)."""
    try:
        return str(join_url(base, location))
    except ValueError:
        return None


def origin_of(url: str) -> str:
    """The serialised origin (``scheme://host[:port]``) of an absolute URL."""
    return str(URL(url).origin)


def stays_on(base: str, location: str) -> bool:
    """Whether a browser at ``base`` told ``Location: location`` stays on ``base``'s origin."""
    target = browser_target(base, location)
    return target is None or origin_of(target) == origin_of(base)


# ------------------------------------------------------------------------------------ cookies
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True)
class StoredCookie:
    name: str
    value: str
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def sent_as(self) -> str:
        """The name a server parses from the ``Cookie`` header a browser then sends: a cookie
        with an empty name is sent as its bare value (``=bridge_session=x`` comes back as
        ``bridge_session=x``)."""
        if self.name:
            return self.name
        return self.value.split("=", 1)[0].strip(" \t") if "=" in self.value else ""


def parse_set_cookie(header: str) -> StoredCookie | None:
    """RFC 6265bis section 5.6: the cookie a browser stores from one ``Set-Cookie`` value, or None
    when it ignores it."""
    if _CTL.search(header):
        return None
    pair, _, rest = header.partition(";")
    if "=" in pair:
        name, _, value = pair.partition("=")
    else:
        name, value = "", pair
    name, value = name.strip(" \t"), value.strip(" \t")
    if not name and not value:
        return None
    attributes: dict[str, str] = {}
    for part in rest.split(";") if rest else []:
        key, _, val = part.partition("=")
        attributes[key.strip(" \t").lower()] = val.strip(" \t")
    return StoredCookie(name, value, attributes)


#: The value the security tests' upstream gives the cookies it tries to plant.
PLANTED = "PLANTED"


def planted_relay_cookies(set_cookies: list[str]) -> list[str]:
    """The ``Set-Cookie`` values with the value :data:`PLANTED` that a browser would store as one
    of the relay's own cookies (the relay's own ``bridge_node`` cookie names a node: not one)."""
    out = []
    for header in set_cookies:
        cookie = parse_set_cookie(header)
        if cookie is not None and cookie.sent_as in RELAY_COOKIES and PLANTED in cookie.value:
            out.append(header)
    return out


def cookie_pairs(header: str) -> list[tuple[str, str]]:
    """``name=value`` pairs of a ``Cookie`` request header, as servers split it."""
    out = []
    for part in header.split(";"):
        name, _, value = part.partition("=")
        if name.strip() or value.strip():
            out.append((name.strip(), value.strip()))
    return out


# ------------------------------------------------------------------------------------ frames
HELLO, STATS = 0x1, 0x9


def frame(type_: int, payload: bytes, stream: int = 0, flags: int = 0) -> bytes:
    """One frame (docs/protocol.md section 3): u24 length, u8 type, u8 flags, u32 stream id."""
    return len(payload).to_bytes(3, "big") + bytes([type_, flags]) + stream.to_bytes(4, "big") + payload


def hello(token: str, node: str, routes: list[str]) -> bytes:
    body = {"version": 1, "token": token, "node": node, "routes": routes}
    return frame(HELLO, json.dumps(body).encode())


def stats(body: dict[str, object]) -> bytes:
    return frame(STATS, json.dumps(body).encode())


# ------------------------------------------------------------------------------------ raw HTTP
@dataclass
class RawResponse:
    """What came back on one connection: ``status`` None when no status line came at all."""

    status: int | None
    headers: list[tuple[str, str]]
    body: bytes
    closed: bool  # the server closed the connection (False: it was still holding it)

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def send_raw(port: int, data: bytes, *, then: bytes = b"", read_timeout: float = 10.0) -> RawResponse:
    """Send ``data`` as it is (then ``then``, ignoring a server that already closed), and read until
    the server closes or stays silent for ``read_timeout`` seconds."""
    out = b""
    closed = False
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
            if then:
                sock.sendall(then)
        try:
            while chunk := sock.recv(65536):
                out += chunk
            closed = True
        except TimeoutError:
            pass
        except OSError:
            closed = True
    return parse_response(out, closed)


def parse_response(raw: bytes, closed: bool = True) -> RawResponse:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    status = int(parts[1]) if raw.startswith(b"HTTP/") and len(parts) > 1 and parts[1].isdigit() else None
    headers = []
    for line in lines[1:] if status is not None else []:
        name, _, value = line.partition(b":")
        headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
    if status is not None and any(
        k.lower() == "transfer-encoding" and "chunked" in v.lower() for k, v in headers
    ):
        body = _dechunk(body)
    return RawResponse(status, headers, body, closed)


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


def http_request(
    method: str,
    target: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
    *,
    host: str = "127.0.0.1",
) -> bytes:
    """A whole HTTP/1.1 request (``Connection: close``) with ``headers`` as Latin-1 bytes."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + body
