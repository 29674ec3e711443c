"""The HTTP rules relay and bridge share (bridge/httprules.py): addressing, which headers travel
and which are rewritten, how a key is presented, what a client is told when a stream fails."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bridge import wire
from bridge.httprules import (
    Address,
    cookies,
    failure_words,
    forward_headers,
    presented_keys,
    resolve,
    response_headers,
    route_gets_cookies,
    safe_next,
    scoped_set_cookie,
    set_cookie_name,
    stays_under_base,
    strip_hop_by_hop,
    strip_relay_cookies,
    upstream_headers,
    valid_request,
)

from ..security_rules import RELAY_COOKIES, cookie_pairs, parse_set_cookie, stays_on


@pytest.mark.parametrize(
    ("raw", "query", "expected"),
    [
        (b"/r/ollama/api/tags", b"", Address("ollama", "/api/tags", "/r/ollama")),
        (b"/r/ollama", b"", Address("ollama", "/", "/r/ollama")),
        (b"/r/ollama/a%20b", b"x=1", Address("ollama", "/a%20b?x=1", "/r/ollama")),  # still encoded
        (b"/", b"", Address("webui", "/")),
        (b"/r", b"", Address("webui", "/r")),
        (b"/api/chat", b"stream=1", Address("webui", "/api/chat?stream=1")),
        (b"/r//x", b"", None),
        (b"/r/./x", b"", None),
        (b"/r/../x", b"", None),
        (b"/r/%6Fllama/x", b"", None),  # a percent-encoded name is never decoded into a route
    ],
)
def test_addressing(raw: bytes, query: bytes, expected: Address | None) -> None:
    assert resolve(raw, query, "webui") == expected


def test_a_route_port_takes_every_path() -> None:
    assert resolve(b"/r/x/y", b"", "webui", port_route="ollama") == Address("ollama", "/r/x/y")


def test_what_can_travel_as_open() -> None:
    assert valid_request("GET", "/x") and valid_request("M-SEARCH", "/")
    assert not valid_request("OPTIONS", "*")
    assert not valid_request("GET", "http://elsewhere/")  # absolute form
    assert not valid_request("GE T", "/") and not valid_request("", "/")


def test_presented_keys_in_header_order() -> None:
    headers = [("X-Bridge-Key", " k2 "), ("Authorization", "Basic zzz"), ("authorization", "BEARER k1")]
    assert presented_keys(headers) == [("header", "k2"), ("bearer", "k1")]
    assert presented_keys([("authorization", "Bearer   "), ("x-bridge-key", "")]) == []


def test_hop_by_hop_headers_and_those_connection_names_never_travel() -> None:
    headers = [
        ("Connection", "keep-alive, X-Secret"),
        ("X-Secret", "1"),
        ("TE", "trailers"),
        ("Accept", "*/*"),
    ]
    assert strip_hop_by_hop(headers) == [("Accept", "*/*")]


def test_the_relay_forwards_without_its_own_credentials() -> None:
    headers = [
        ("Host", "relay.example"),
        ("Authorization", "Bearer bk_relay_key"),
        ("X-Bridge-Key", "bk_other"),
        ("X-Forwarded-For", "6.6.6.6"),
        ("Cookie", "bridge_session=s; webui=w; bridge_node=n"),
        ("Transfer-Encoding", "chunked"),
        ("Accept", "*/*"),
    ]
    out = forward_headers(headers, client="1.2.3.4", https=True, prefix="/r/ollama", drop_bearer=True)
    assert out == [
        ("Host", "relay.example"),
        ("Cookie", "webui=w"),
        ("Accept", "*/*"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "relay.example"),
        ("x-forwarded-prefix", "/r/ollama"),
    ]
    # A key given as X-Bridge-Key (or a cookie login) leaves the client's own Authorization alone.
    kept = forward_headers(headers[1:2], client="", https=False, prefix="", drop_bearer=False)
    assert ("Authorization", "Bearer bk_relay_key") in kept


def test_the_bridge_rewrites_host_and_origin_for_its_upstream() -> None:
    headers = [("Host", "relay.example"), ("Origin", "https://evil.example"), ("Content-Length", "")]
    assert upstream_headers("http://127.0.0.1:11434/base", headers) == [
        ("Host", "127.0.0.1:11434"),
        ("Origin", "http://127.0.0.1:11434"),
    ]


@pytest.mark.parametrize("code", list(wire.ErrorCode))
def test_failure_words_name_no_address_and_match_the_status(code: int) -> None:
    status, words = failure_words(code, "engine")
    assert status == wire.STATUS_FOR_CODE.get(code, 502)
    assert words and "127.0.0.1" not in words and "bridge:" not in words


# ------------------------------------------------------------------------ issue 16, browser-facing
# Judged by what browsers do (tests/security_rules.py: the WHATWG URL parser through ada-url, the
# RFC 6265bis cookie parser), never by the rule under test.

BASE = "https://relay.example/_relay/login"


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=12) | st.sampled_from(["/\t/evil.example", "\\\\evil.example", "/\\evil.example"]))
@example("/\t/evil.example")
@example("/\u2028")
@example("/\x00")
@example("\t//evil.example")
@example("/\ud800")  # a lone surrogate (cannot come from bytes, but the rule takes any str)
def test_safe_next_always_stays_on_the_relay_and_can_be_sent(raw: str) -> None:
    location = safe_next(raw)
    assert location.startswith("/") and not location.startswith("//")
    assert stays_on(BASE, location), f"{raw!r} -> {location!r}"
    location.encode("ascii")  # a header value any server can send


def test_safe_next_keeps_what_was_already_a_path() -> None:
    assert safe_next("/r/ollama/api/tags?x=1&y=%2F") == "/r/ollama/api/tags?x=1&y=%2F"
    assert safe_next("/\u00e9 x") == "/%C3%A9%20x"
    assert safe_next("//evil.example") == safe_next("https://evil.example") == safe_next("") == "/"


SET_COOKIES = [
    "bridge_session=x; Path=/",
    " bridge_session=x",
    "bridge_session =x",
    "bridge_session\t=x",
    "=bridge_session=x",
    " = bridge_session =x",
    "bridge_node=x",
    "app=1",
    "=app=1",
    "bare",
    "",
    "token=1; Path=/; Domain=relay.example",
]


@settings(max_examples=500, deadline=None)
@given(st.sampled_from(SET_COOKIES) | st.text(st.characters(max_codepoint=0xFF), max_size=24))
def test_set_cookie_name_is_the_name_a_browser_sends_back(value: str) -> None:
    stored = parse_set_cookie(value)
    if stored is not None and stored.sent_as in RELAY_COOKIES:
        assert set_cookie_name(value) in RELAY_COOKIES, value
    # and what the relay passes on never becomes one of its cookies
    passed = response_headers(200, [("Set-Cookie", value)], route_prefix="/r/up", target="/a/b") or []
    for _, kept in passed:
        after = parse_set_cookie(kept)
        assert after is None or after.sent_as not in RELAY_COOKIES, (value, kept)


def _path(set_cookie: str, request_path: str) -> str:
    """The path a browser scopes a cookie to (RFC 6265bis 5.6.4, default-path 5.1.4)."""
    cookie = parse_set_cookie(set_cookie)
    assert cookie is not None
    path = cookie.attributes.get("path", "")
    if path.startswith("/"):
        return path
    return request_path.split("?", 1)[0].rsplit("/", 1)[0] or "/"


@pytest.mark.parametrize(
    ("target", "path"),
    [("/", "/r/up"), ("/", "/r/up/"), ("/x", "/r/up/x"), ("/a/b/c?q=1", "/r/up/a/b/c?q=1")],
)
@pytest.mark.parametrize(
    "value", ["t=1", "t=1; Path=/", "t=1; Path=/r", "t=1; path=rel", "t=1; Path=", "t=1; HttpOnly"]
)
def test_a_route_under_r_sets_cookies_only_under_its_prefix(value: str, target: str, path: str) -> None:
    scoped = scoped_set_cookie(value + "; Domain=relay.example", "/r/up", target)
    assert "domain" not in scoped.lower()
    where = _path(scoped, path)
    assert where == "/r/up" or where.startswith("/r/up/"), (value, path, scoped)


def test_the_default_route_keeps_its_cookies_as_set_but_their_domain() -> None:
    assert scoped_set_cookie("token=1; Path=/; HttpOnly", "", "/x") == "token=1; Path=/; HttpOnly"
    assert scoped_set_cookie("token=1; Domain=.relay.example; Path=/", "", "/") == "token=1; Path=/"


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from([*RELAY_COOKIES, " bridge_session", "bridge_node\t", "token", ""])
            | st.text(max_size=4),
            st.text(max_size=6),
        ),
        max_size=5,
    )
)
def test_no_cookie_parsed_as_the_relays_is_forwarded(pairs: list[tuple[str, str]]) -> None:
    value = "; ".join(f"{n}={v}" for n, v in pairs)
    assert not [n for n, _ in cookie_pairs(strip_relay_cookies(value)) if n in RELAY_COOKIES]
    out = forward_headers([("Cookie", value)], client="", https=False, prefix="", drop_bearer=False)
    sent = next((v for k, v in out if k == "Cookie"), "")
    assert not [n for n, _ in cookie_pairs(sent) if n in RELAY_COOKIES]


def test_cookies_are_found_by_their_trimmed_name_in_order() -> None:
    headers = [("Cookie", "a=1; bridge_session = s1 ;x"), ("cookie", "\tbridge_session=s2")]
    assert cookies(headers, "bridge_session") == ["s1", "s2"]


def test_which_route_receives_the_browsers_cookies() -> None:
    assert route_gets_cookies("", False, "webui", ())  # the default route, at /
    assert not route_gets_cookies("/r/webui", False, "webui", ())
    assert not route_gets_cookies("", True, "side", ())  # a --route-port: another port, same host
    assert route_gets_cookies("/r/up", False, "up", ("up",)) and route_gets_cookies("", True, "up", ("up",))
    headers = [("Cookie", "token=t; bridge_session=s"), ("Host", "h")]
    out = forward_headers(
        headers, client="", https=False, prefix="/r/up", drop_bearer=False, send_cookies=False
    )
    assert not [k for k, _ in out if k.lower() == "cookie"]


def test_no_forwarding_header_of_a_client_reaches_an_upstream() -> None:
    planted = [
        ("Forwarded", "for=6.6.6.6"),
        ("X-Real-IP", "6.6.6.6"),
        ("True-Client-IP", "6.6.6.6"),
        ("X-Client-IP", "6.6.6.6"),
        ("CF-Connecting-IP", "6.6.6.6"),
        ("X-Forwarded-Port", "443"),
        ("X-Forwarded-Server", "6.6.6.6"),
        ("X-Forwarded-For", "6.6.6.6"),
    ]
    out = forward_headers(planted, client="1.2.3.4", https=False, prefix="", drop_bearer=False)
    assert out == [("x-forwarded-for", "1.2.3.4"), ("x-forwarded-proto", "http")]


@pytest.mark.parametrize(
    ("target", "inside"),
    [
        ("/inside/x", True),
        ("/a/../b", True),
        ("/a/./b/..", True),
        ("/?x=/../..", True),
        ("/../outside", False),
        ("/%2e%2e/outside", False),
        ("/.%2E/outside", False),
        ("/a/../../outside", False),
        ("/./../outside", False),
        ("/..", False),
        ("/..\\outside", False),
        ("/a%2f..%2f..%2fx", False),
    ],
)
def test_a_target_stays_under_a_routes_base_path(target: str, inside: bool) -> None:
    assert stays_under_base("http://upstream/base", target) is inside
    assert stays_under_base("http://upstream", target)  # no base path: nothing to leave


def test_the_user_headers_come_from_the_relay_never_from_the_client() -> None:
    from bridge.config import RelayConfig
    from bridge.httprules import user_email, with_user

    planted = [
        ("Host", "relay"),
        ("X-Bridge-User-Email", "admin@localhost"),
        ("x-bridge-user-name", "Admin"),
        ("X-BRIDGE-USER-ROLE", "admin"),
        ("Accept", "*/*"),
    ]
    # Without a user (another route): every X-Bridge-User-* goes, whatever its case; the rest stays.
    assert with_user(planted, None) == [("Host", "relay"), ("Accept", "*/*")]
    # With one: only the relay's own, from the key (its id in the address, its label as the name,
    # percent-encoded as Open WebUI decodes it).
    out = with_user(planted, "3f2a9c1d", "Zoë's laptop")
    users = [(k, v) for k, v in out if k.lower().startswith("x-bridge-user-")]
    assert users == [
        ("x-bridge-user-email", "3f2a9c1d@relay.invalid"),
        ("x-bridge-user-name", "Zo%C3%AB%27s laptop"),
    ]
    assert all(v.isascii() for _, v in out)
    assert with_user([], "env-AB12cd34")[0] == ("x-bridge-user-email", "env-ab12cd34@relay.invalid")
    assert with_user([], "k1")[1] == ("x-bridge-user-name", "k1")  # no label: the id
    assert user_email("3f2a9c1d") != user_email("3f2a9c1e")
    # Which route gets them: the default route unless told, none with "-".
    assert RelayConfig(default_route="webui").identity_route == "webui"
    assert RelayConfig(default_route="webui", user_route="chat").identity_route == "chat"
    assert RelayConfig(default_route="webui", user_route="-").identity_route is None
