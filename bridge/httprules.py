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
#: Request headers by which a client would choose the address, host or scheme an upstream believes
#: (docs/security.md §5): dropped from clients and jobs, with every other ``X-Forwarded-*``.
CLIENT_FORWARDING = frozenset({"forwarded", "x-real-ip", "true-client-ip", "x-client-ip", "cf-connecting-ip"})
#: The relay's own cookies (matched by their parsed, trimmed name).
RELAY_COOKIES = frozenset({COOKIE_NAME, NODE_COOKIE})
#: What a login redirect's ``next`` keeps as it is (RFC 3986 path and query characters, ``%``
#: included): every other byte is percent-encoded (docs/security.md §8).
_NEXT_SAFE = "-._~!$&'()*+,;=:@/?%"
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


@functools.lru_cache(maxsize=256)
def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@functools.lru_cache(maxsize=256)
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


def cookie_name(part: str) -> str:
    """The name a server parses from one ``name=value`` pair of a ``Cookie`` header: the text before
    the first ``=``, whitespace trimmed ("" for a pair without ``=``). Trimmed as Python's
    ``str.strip`` does, a superset of what browsers and servers trim: a name that any of them reads
    as one of the relay's is one."""
    name, sep, _ = part.partition("=")
    return name.strip() if sep else ""


def cookies(headers: Iterable[tuple[str, str]], name: str) -> list[str]:
    """Every value of cookie ``name`` (by parsed, trimmed name) in the request's ``Cookie``
    headers, in order: browsers send all the cookies that match, and the first valid one counts."""
    out = []
    for key, value in headers:
        if key.lower() == "cookie":
            for part in value.split(";"):
                if cookie_name(part) == name:
                    out.append(part.partition("=")[2].strip())
    return out


def cookie(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of cookie ``name`` in the request's ``Cookie`` headers."""
    found = cookies(headers, name)
    return found[0] if found else None


def strip_relay_cookies(value: str) -> str:
    """A ``Cookie`` header's value without the relay's own cookies (by parsed, trimmed name)."""
    return "; ".join(
        part.strip() for part in value.split(";") if part.strip() and cookie_name(part) not in RELAY_COOKIES
    )


def set_cookie_name(value: str) -> str:
    """The name a browser then sends back for a cookie stored from the ``Set-Cookie`` ``value``
    (RFC 6265bis 5.6: the pair before the first ``;``, whitespace around the name trimmed; a pair
    without ``=`` is a cookie with an empty name, sent back as its bare value, so that
    ``=bridge_session=x`` comes back as ``bridge_session=x``). Trimmed as :func:`cookie_name`."""
    pair = value.partition(";")[0]
    name, sep, rest = pair.partition("=")
    if not sep:
        name, rest = "", pair
    name = name.strip()
    if name:
        return name
    return cookie_name(rest.strip())


def scoped_set_cookie(value: str, prefix: str, target: str) -> str:
    """A ``Set-Cookie`` value of an upstream as the relay passes it on (docs/security.md §5):
    ``Domain`` removed (a cookie stays on the relay's host); under a route prefix (``/r/<route>``)
    its ``Path`` is put under the prefix (an absent Path already is, RFC 6265bis 5.1.4, but for a
    request to the bare prefix; a relative one becomes the prefix plus the directory of
    ``target``), so that a route can neither set a cookie another route receives nor replace the
    default route's. A value with nothing to change is passed as it is."""
    pair, _, rest = value.partition(";")
    kept: list[str] = []
    path: str | None = None
    changed = False
    for attribute in rest.split(";") if rest else []:
        key = attribute.partition("=")[0].strip(" \t").lower()
        if key == "domain":
            changed = True
        elif key == "path":
            path = attribute.partition("=")[2].strip(" \t")
        else:
            kept.append(attribute.strip(" \t"))
    if prefix and path is not None and path.startswith("/"):
        path, changed = prefix + (path if path != "/" else ""), True
    elif prefix and (path is not None or target.partition("?")[0] == "/"):
        # No usable Path: the browser's default path is the request's directory, under the prefix,
        # except for the prefix itself without its slash (``/r/up``, whose directory is ``/r``).
        target_path = target.partition("?")[0]
        path, changed = prefix + target_path[: target_path.rfind("/")], True
    if not changed:
        return value
    if path is not None:
        kept.append(f"Path={path}")
    return "; ".join([pair.strip(" \t"), *kept])


def safe_next(raw: str) -> str:
    """Where the login page sends a browser: a path on this relay, whatever ``raw`` holds
    (docs/security.md §8). Every character outside RFC 3986's path and query characters is
    percent-encoded (as UTF-8: tab, CR, LF, space, ``\\``, controls, non-ASCII), so a browser's
    URL parser (WHATWG) has nothing to drop or turn into ``/``; then anything that does not start
    with exactly one ``/`` becomes ``/``."""
    encoded = quote(raw, safe=_NEXT_SAFE, encoding="utf-8", errors="surrogatepass")
    if not encoded.startswith("/") or encoded.startswith("//"):
        return "/"
    return encoded


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


#: Escapes that servers may read as ``.``, ``/`` or ``\\`` when they resolve a path.
_PATH_ESCAPES = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


def stays_under_base(base_url: str, target: str) -> bool:
    """Whether ``target`` (origin-form, as the client sent it), appended to a route's upstream URL
    ``base_url``, stays under that URL's path (docs/security.md §2): its path read as a server might
    (``%2e``/``%2f``/``%5c`` decoded, ``\\`` as ``/``), RFC 3986 dot segments never climb above
    the target's root. A URL without a path has nothing to leave: always True."""
    if urlsplit(base_url).path.strip("/") == "":
        return True
    path = target.partition("?")[0]
    path = _PATH_ESCAPES.sub(lambda m: chr(int(m.group(1), 16)), path).replace("\\", "/")
    depth = 0
    for segment in path.split("/")[1:]:
        if segment == "..":
            depth -= 1
            if depth < 0:
                return False
        elif segment not in ("", "."):
            depth += 1
    return True


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


def client_forwarding(name: str) -> bool:
    """Whether a request header (lower-case ``name``) is one by which a client would choose the
    address, host or scheme an upstream believes: ``Forwarded``, ``X-Real-IP`` and kin, and every
    ``X-Forwarded-*`` (docs/security.md §5). Only the relay sets the forwarding headers."""
    return name in CLIENT_FORWARDING or name.startswith("x-forwarded-")


def route_gets_cookies(prefix: str, port_route: bool, route: str, cookie_routes: Iterable[str]) -> bool:
    """Whether a request to ``route`` carries the browser's cookies on to its upstream
    (docs/security.md §5): the default route at ``/`` does; a route under ``/r/<route>/`` or at the
    root of a ``--route-port`` only when listed in ``cookie_routes`` (``--cookie-route``), since
    browsers scope cookies by host, not by path prefix or port."""
    if not prefix and not port_route:
        return True
    return route in cookie_routes


def forward_headers(
    headers: Iterable[tuple[str, str]],
    *,
    client: str,
    https: bool,
    prefix: str,
    drop_bearer: bool,
    send_cookies: bool = True,
) -> Headers:
    """A client's request headers as the relay forwards them: hop-by-hop headers, the client's own
    forwarding headers (:func:`client_forwarding`), its ``X-Bridge-Key``, its ``Authorization``
    when that carried the relay's key (``drop_bearer``) and the relay's cookies go (every cookie
    unless ``send_cookies``, see :func:`route_gets_cookies`); ``X-Forwarded-For``/``-Proto``/
    ``-Host``/``-Prefix`` are set by the relay."""
    out: Headers = []
    host = ""
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if client_forwarding(lname) or lname == "x-bridge-key":
            continue
        if lname == "authorization" and drop_bearer:
            continue  # the relay's own key, not the upstream's
        if lname == "cookie":
            value = strip_relay_cookies(value) if send_cookies else ""
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


def response_headers(
    status: int, headers: Iterable[tuple[str, str]], *, route_prefix: str = "", target: str = "/"
) -> Headers | None:
    """The headers of a bridge's answer to an HTTP request as the relay passes them on, or None when
    the head cannot be passed on: a 1xx status (an interim or protocol switch the client did not ask
    for) or one outside 200-599. Hop-by-hop headers, header names that are not tokens, values with
    control characters or beyond Latin-1, the relay's own headers and a ``Set-Cookie`` a browser
    would store as one of the relay's own cookies (:func:`set_cookie_name`) are dropped; other
    ``Set-Cookie`` values lose ``Domain`` and are scoped under ``route_prefix``
    (:func:`scoped_set_cookie`; ``target``: the request's, for the default path)."""
    if not 200 <= status <= 599:
        return None
    out = []
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if not _TOKEN.match(name) or lname in _OWN_RESPONSE_HEADERS:
            continue
        if _BAD_VALUE.search(value):
            continue
        if lname == "set-cookie":
            if set_cookie_name(value) in RELAY_COOKIES:
                continue
            value = scoped_set_cookie(value, route_prefix, target)
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


def valid_header_field(name: str, value: str) -> bool:
    """Whether ``name: value`` may be sent as a request header (a token name; a value without
    control characters other than tab, within Latin-1)."""
    return bool(_TOKEN.match(name)) and not _BAD_VALUE.search(value)
