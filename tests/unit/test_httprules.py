"""The HTTP rules relay and bridge share (bridge/httprules.py): addressing, which headers travel
and which are rewritten, how a key is presented, what a client is told when a stream fails."""

from __future__ import annotations

import pytest

from bridge import wire
from bridge.httprules import (
    Address,
    failure_words,
    forward_headers,
    presented_keys,
    resolve,
    strip_hop_by_hop,
    upstream_headers,
    valid_request,
)


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
