"""The HTTP rules relay and bridge share, as pure functions (no I/O): how a path names a route, which
headers travel through a proxy and which are rewritten, how a client presents its key, what a client
is told when a stream fails. The relay and the bridge's local endpoint follow the same rules because
they call the same functions.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from .wire.constants import STATUS_FOR_CODE, ErrorCode
from .wire.frames import valid_method

Headers = list[tuple[str, str]]

#: Hop-by-hop headers: they describe one connection, never travel through a proxy (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: The relay's browser session cookie (a signed key id) and the cookie that keeps a browser on the
#: node that served it: the relay's own, never forwarded, never taken from a bridge's answer.
COOKIE_NAME = "bridge_session"
NODE_COOKIE = "bridge_node"
#: Request headers the relay sets itself; a client's values are dropped.
FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix")
#: Headers of a client's WebSocket handshake that the bridge's own handshake replaces.
WS_HANDSHAKE = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"}
)
#: Response headers a bridge may not set: the relay's own.
_OWN_RESPONSE_HEADERS = frozenset({"x-bridge-node", "x-bridge-idempotent"})
#: A header name (RFC 9110 token).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: What a header value may not hold: control characters other than tab, or anything past Latin-1.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")


# ------------------------------------------------------------------------------------------ basics


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of a header, by case-insensitive name."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> Headers:
    """Drop hop-by-hop headers and every header the Connection header names."""
    items = list(headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_of(url: str) -> str:
    return urlsplit(url).netloc


@functools.lru_cache(maxsize=4096)
def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cookie(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The value of cookie ``name`` in the request's ``Cookie`` headers."""
    prefix = name + "="
    for key, value in headers:
        if key.lower() == "cookie":
            for part in value.split(";"):
                part = part.strip()
                if part.startswith(prefix):
                    return part[len(prefix) :]
    return None


def strip_cookie(value: str, name: str) -> str:
    """A ``Cookie`` header's value without cookie ``name``."""
    return "; ".join(
        part.strip() for part in value.split(";") if part.strip() and not part.strip().startswith(name + "=")
    )


# ------------------------------------------------------------------------------------------ addressing


@dataclass(slots=True)
class Address:
    """Where a request goes: its route, the target the upstream gets, and the prefix the client's
    path had in front of it (``/r/<route>``, for ``X-Forwarded-Prefix``)."""

    route: str
    target: str
    prefix: str = ""


def resolve(
    raw_path: bytes, query: bytes, default_route: str, port_route: str | None = None
) -> Address | None:
    """The route and target of a request (docs/protocol.md, addressing) from its raw,
    still-percent-encoded path: ``/r/<route>/<rest>`` names a route, anything else goes to
    ``default_route`` (or to ``port_route``, the route of the port it came in on). None for a
    malformed route name: empty, ``.``, ``..`` or holding a percent escape."""
    prefix = ""
    if port_route is not None:
        route, rest = port_route, raw_path
    elif raw_path.startswith(b"/r/"):
        name, _, tail = raw_path[3:].partition(b"/")
        route, rest = name.decode("latin-1"), b"/" + tail
        prefix = f"/r/{route}"
        if not route or unquote(route) != route or route in (".", ".."):
            return None
    else:
        route, rest = default_route, raw_path
    target = rest.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
    return Address(route, target, prefix)


def valid_request(method: str, target: str) -> bool:
    """Whether a request can travel as OPEN: a method token and an origin-form target (``OPTIONS *``
    and absolute-form targets cannot)."""
    return valid_method(method) and target.startswith("/")


# ------------------------------------------------------------------------------------------ keys


def presented_key(name: str, value: str) -> tuple[str, str] | None:
    """``(how, key)`` when this header presents a client key: ``("bearer", key)`` for
    ``Authorization: Bearer <key>`` (scheme case-insensitive), ``("header", key)`` for
    ``X-Bridge-Key``; None otherwise (another header, or an empty key)."""
    lname = name.lower()
    if lname == "authorization" and value[:7].lower() == "bearer ":
        key = value[7:].strip()
        return ("bearer", key) if key else None
    if lname == "x-bridge-key":
        key = value.strip()
        return ("header", key) if key else None
    return None


def presented_keys(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every client key a request presents, in header order."""
    return [found for name, value in headers if (found := presented_key(name, value))]


# ------------------------------------------------------------------------------------------ rewriting


def forward_headers(
    headers: Iterable[tuple[str, str]], *, client: str, https: bool, prefix: str, drop_bearer: bool
) -> Headers:
    """A client's request headers as the relay forwards them: hop-by-hop headers, the client's own
    ``X-Forwarded-*``, its ``X-Bridge-Key``, its ``Authorization`` when that carried the relay's key
    (``drop_bearer``) and the relay's cookies go; ``X-Forwarded-For``/``-Proto``/``-Host``/
    ``-Prefix`` are set by the relay."""
    out: Headers = []
    host = ""
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if lname in FORWARDED or lname == "x-bridge-key":
            continue
        if lname == "authorization" and drop_bearer:
            continue  # the relay's own key, not the upstream's
        if lname == "cookie":
            value = strip_cookie(strip_cookie(value, COOKIE_NAME), NODE_COOKIE)
            if not value:
                continue
        if lname == "host":
            host = value
        out.append((name, value))
    out.append(("x-forwarded-for", client))
    out.append(("x-forwarded-proto", "https" if https else "http"))
    if host:
        out.append(("x-forwarded-host", host))
    if prefix:
        out.append(("x-forwarded-prefix", prefix))
    return out


def upstream_headers(url: str, headers: Iterable[tuple[str, str]]) -> Headers:
    """Request headers as the bridge sends them to an upstream at ``url``: ``Host`` rewritten
    (Ollama answers 403 to a foreign Host), ``Origin`` rewritten to the upstream's own origin (Ollama
    checks it against OLLAMA_ORIGINS), hop-by-hop headers and an empty ``Content-Length`` dropped."""
    out = [("Host", host_of(url))]
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if lname == "host" or (lname == "content-length" and value == ""):
            continue
        if lname == "origin":
            value = origin_of(url)
        out.append((name, value))
    return out


def response_headers(status: int, headers: Iterable[tuple[str, str]]) -> Headers | None:
    """The headers of a bridge's answer to an HTTP request as the relay passes them on, or None when
    the head cannot be passed on: a 1xx status (an interim or protocol switch the client did not ask
    for) or one outside 200-599. Hop-by-hop headers, header names that are not tokens, values with
    control characters or beyond Latin-1, the relay's own headers and a ``Set-Cookie`` of the relay's
    session cookie are dropped."""
    if not 200 <= status <= 599:
        return None
    out = []
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if not _TOKEN.match(name) or lname in _OWN_RESPONSE_HEADERS:
            continue
        if lname == "set-cookie" and value.lstrip().startswith(f"{COOKIE_NAME}="):
            continue
        if _BAD_VALUE.search(value):
            continue
        out.append((name, value))
    # One Content-Length, made of digits, or none (the body is then sent chunked): never two that
    # disagree, which would desynchronise the client's connection. None on 204 and 304, which carry
    # no body whatever length they name (uvicorn would wait for one).
    lengths = {v.strip() for k, v in out if k.lower() == "content-length"}
    if lengths:
        out = [(k, v) for k, v in out if k.lower() != "content-length"]
        if len(lengths) == 1 and (length := lengths.pop()).isdigit() and status not in (204, 304):
            out.append(("content-length", length))
    return out


# ------------------------------------------------------------------------------------------ the user


#: Who the client is, for an upstream that signs users in from a trusted proxy's headers (Open
#: WebUI's ``WEBUI_AUTH_TRUSTED_EMAIL_HEADER``/``_NAME_HEADER``): set by the relay, from the client key
#: it authenticated, on its user route only; every ``X-Bridge-User-*`` header a client sends is
#: dropped on every route (docs/security.md §5), so a client cannot name someone else.
USER_EMAIL_HEADER = "x-bridge-user-email"
USER_NAME_HEADER = "x-bridge-user-name"
_USER_HEADER_PREFIX = "x-bridge-user-"
#: The domain of the addresses the relay makes up (RFC 2606's ``.invalid``: never a real mailbox).
USER_DOMAIN = "relay.invalid"


def user_email(key_id: str) -> str:
    """The e-mail address the relay gives the holder of client key ``key_id``: the key's id (unique
    and stable, unlike its label) at :data:`USER_DOMAIN`, lower-case (Open WebUI lower-cases it)."""
    return f"{key_id.lower()}@{USER_DOMAIN}"


def with_user(headers: Iterable[tuple[str, str]], key_id: str | None, label: str = "") -> Headers:
    """``headers`` without any ``X-Bridge-User-*`` header, plus, when ``key_id`` is given, the
    relay's own: ``X-Bridge-User-Email`` (:func:`user_email`) and ``X-Bridge-User-Name`` (the key's
    label, else its id; percent-encoded as Open WebUI's trusted-header sign-in decodes it)."""
    out = [(k, v) for k, v in headers if not k.lower().startswith(_USER_HEADER_PREFIX)]
    if key_id:
        out.append((USER_EMAIL_HEADER, user_email(key_id)))
        out.append((USER_NAME_HEADER, quote(label or key_id, safe=" @._-")))
    return out


# ------------------------------------------------------------------------------------------ failures


def failure_words(code: int, route: str) -> tuple[int, str]:
    """The HTTP status and the message a client gets when a stream fails before its answer, from
    the RESET ``code`` alone: words a user can act on, never the bridge's own reason (which may
    name an upstream's address)."""
    status = STATUS_FOR_CODE.get(code, 502)
    upstream = f"the upstream of route {route!r}"
    words: dict[int, str] = {
        ErrorCode.NO_ROUTE: f"unknown route {route!r}",
        ErrorCode.UPSTREAM_UNREACHABLE: f"the bridge could not reach {upstream} "
        "(unreachable: is it running?); try again shortly",
        ErrorCode.UPSTREAM_TIMEOUT: f"{upstream} did not answer in time; try again shortly",
        ErrorCode.UPSTREAM_ERROR: f"{upstream} failed before answering; try again shortly",
        ErrorCode.REFUSED_STREAM: "the bridge is shutting down or restarting; try again shortly",
        ErrorCode.GOING_AWAY: "the bridge is shutting down or restarting; try again shortly",
        ErrorCode.TOO_MANY_STREAMS: "the bridge is serving as many requests as it can; try again shortly",
        ErrorCode.HEADERS_TOO_LARGE: "request header fields too large",
        ErrorCode.BODY_TOO_LARGE: "request body too large",
    }
    default = f"the bridge could not complete the request (error code {code}); try again shortly"
    return status, words.get(code, default)
