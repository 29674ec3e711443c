"""The browser-facing checks of issue 16 that every relay must make (docs/security.md), run against the
Python relay and the Cloudflare relay under workerd, through the real bridge to the scripted
upstream (tests/scripted_upstream.py), with real clients.

Each check that a relay still fails is marked ``xfail(strict=True)`` for that relay only
(``fails_on`` for both, ``expect_failure_on`` for one, chosen by the relay kind at run time). Both
relays now make every check here (issue 16's fixes in bridge/ and deployment/cloudflare/src), so
none is marked. The deeper checks (every byte sequence of ``next``, every Origin value, every cookie
header) are property tests against the Python relay in tests/test_security_browser.py; the
Cloudflare relay's pure rules (src/rules.ts) have their own in
deployment/cloudflare/test/rules.test.ts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
import websockets
from websockets.typing import Origin

from ..procs import API_KEY, Relay
from ..security_rules import cookie_pairs, http_request, planted_relay_cookies, send_raw, stays_on
from .conftest import RELAYS, scripted_relay

KEY = {"Authorization": f"Bearer {API_KEY}"}
FOREIGN = "http://evil.example"


def fails_on(*kinds: str, reason: str) -> pytest.MarkDecorator:
    """Today's state of a check: it fails on the relays named (strict: a pass is news)."""
    return pytest.mark.xfail(
        strict=True, raises=AssertionError, reason=f"issue 16 ({', '.join(kinds)}): {reason}"
    )


def kind(relay: Relay) -> str:
    return str(getattr(relay, "kind", "python"))


def expect_failure_on(
    request: pytest.FixtureRequest, relay: Relay, kinds: tuple[str, ...], reason: str
) -> None:
    """Mark this run xfail (strict) when it runs against one of ``kinds``."""
    if kind(relay) in kinds:
        request.applymarker(fails_on(kind(relay), reason=reason))


@pytest.fixture(scope="module", params=RELAYS)
def guarded(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay of each kind; its default route ``app`` and route ``up`` lead to the scripted upstream."""
    with scripted_relay(request.param, tmp_path_factory.mktemp(f"security-{request.param}")) as relay:
        yield relay


def login(relay: Relay) -> str:
    r = httpx.post(relay.url + "/_relay/login", data={"key": API_KEY, "next": "/"}, timeout=30)
    assert r.status_code == 303, r.text
    return r.cookies["bridge_session"]


def say(status: int, headers: list[list[str]], body: str = "ok") -> str:
    return "spec=" + quote(json.dumps({"status": status, "headers": headers, "body": body}), safe="")


def test_login_redirect_stays_on_the_relay(guarded: Relay, request: pytest.FixtureRequest) -> None:
    host = f"127.0.0.1:{guarded.port}"
    base = guarded.url + "/_relay/login"
    for next_ in (
        "/\t/evil.example",
        "/\\evil.example",
        "//evil.example",
        "/\r\n/evil.example",
        "\t//evil.example",
    ):
        form = f"key={quote(API_KEY)}&next={quote(next_, safe='')}".encode()
        headers = [("Content-Type", "application/x-www-form-urlencoded")]
        r = send_raw(guarded.port, http_request("POST", "/_relay/login", headers, form, host=host))
        assert r.status == 303, f"next={next_!r}: {r.status}"
        location = r.header("location")
        assert location is not None and stays_on(base, location), f"next={next_!r}: Location {location!r}"


async def test_cookie_requests_from_a_foreign_origin_are_refused(
    guarded: Relay, request: pytest.FixtureRequest
) -> None:
    cookie = {"Cookie": f"bridge_session={login(guarded)}"}
    own = f"http://127.0.0.1:{guarded.port}"
    async with httpx.AsyncClient(base_url=guarded.url, timeout=30) as c:
        assert (await c.post("/r/up/x", headers={**cookie, "Origin": own}, content=b"{}")).status_code == 200
        assert (await c.post("/r/up/x", headers={**KEY, "Origin": FOREIGN}, content=b"{}")).status_code == 200
        assert (await c.get("/r/up/x", headers={**cookie, "Origin": FOREIGN})).status_code == 200
        r = await c.post("/r/up/x", headers={**cookie, "Origin": FOREIGN}, content=b"{}")
        assert r.status_code == 403, f"a foreign page's POST with the user's cookie: {r.status_code}"

    async def opens(origin: str, headers: dict[str, str]) -> int:
        try:
            async with websockets.connect(
                guarded.ws_url + "/r/up/ws/echo", origin=Origin(origin), additional_headers=headers
            ):
                return 101
        except websockets.InvalidStatus as exc:
            return exc.response.status_code

    assert await opens(own, cookie) == 101
    assert await opens(FOREIGN, KEY) == 101
    assert await opens(FOREIGN, cookie) == 403, "a foreign page opened the user's WebSocket"


def test_login_form_refuses_a_foreign_origin(guarded: Relay, request: pytest.FixtureRequest) -> None:
    form = {"key": API_KEY, "next": "/"}
    own = f"http://127.0.0.1:{guarded.port}"
    assert httpx.post(guarded.url + "/_relay/login", data=form, headers={"Origin": own}).status_code == 303
    r = httpx.post(guarded.url + "/_relay/login", data=form, headers={"Origin": FOREIGN})
    assert r.status_code == 403 and "set-cookie" not in r.headers, (
        f"login from a foreign page: {r.status_code}"
    )


SPOOFED = [
    "bridge_session=PLANTED; Path=/",
    "bridge_session =PLANTED",
    "=bridge_session=PLANTED",
    "bridge_node=PLANTED",
]


async def test_an_upstream_cannot_set_the_relays_cookies(
    guarded: Relay, request: pytest.FixtureRequest
) -> None:
    headers = [["Set-Cookie", v] for v in SPOOFED] + [["Set-Cookie", "app_cookie=kept"]]
    async with httpx.AsyncClient(base_url=guarded.url, headers=KEY, timeout=30) as c:
        r = await c.get(f"/r/up/say?{say(200, headers)}")
    set_cookies = r.headers.get_list("set-cookie")
    assert "app_cookie=kept" in set_cookies
    assert not planted_relay_cookies(set_cookies), f"the upstream set {planted_relay_cookies(set_cookies)}"
    try:
        async with websockets.connect(
            f"{guarded.ws_url}/r/up/ws/say?{say(403, headers)}", additional_headers=KEY
        ):
            pass
    except websockets.InvalidStatus as exc:
        assert exc.response.status_code == 403
        planted = planted_relay_cookies(exc.response.headers.get_all("set-cookie"))
        assert not planted, f"a refused WebSocket upgrade set {planted}"
    else:
        raise AssertionError("the upstream's refusal was not passed on")


def test_logout_ends_the_session_on_the_relay(guarded: Relay) -> None:
    cookie = {"Cookie": f"bridge_session={login(guarded)}"}
    assert httpx.get(guarded.url + "/_relay/status", headers=cookie).status_code == 200
    assert httpx.get(guarded.url + "/_relay/logout", headers=cookie).status_code == 303
    r = httpx.get(guarded.url + "/_relay/status", headers=cookie)
    assert r.status_code == 401, f"a copy of the cookie after logout: {r.status_code}"
    # The ended cookie beside a valid key: the key still counts (a program that kept a cookie jar).
    for path in ("/_relay/status", "/r/up/who"):
        r = httpx.get(guarded.url + path, headers={**cookie, **KEY}, timeout=30)
        assert r.status_code == 200, f"{path} with a valid key beside an ended cookie: {r.status_code}"


def test_clients_cannot_set_the_forwarding_headers_an_upstream_believes(
    guarded: Relay, request: pytest.FixtureRequest
) -> None:
    planted = {
        "Forwarded": "for=6.6.6.6;host=evil.example",
        "X-Real-IP": "6.6.6.6",
        "X-Forwarded-For": "6.6.6.6",
    }
    seen = httpx.get(guarded.url + "/r/up/who", headers={**KEY, **planted}, timeout=30).json()["headers"]
    bad = [(k, v) for k, v in seen if "6.6.6.6" in v or "evil.example" in v]
    assert not bad, f"the upstream believed the client's {bad}"


def test_a_non_ascii_cookie_value_gets_a_clean_refusal(
    guarded: Relay, request: pytest.FixtureRequest
) -> None:
    cookie = login(guarded)
    key_id, expiry, _ = cookie.rsplit(".", 2)
    raw = f"GET /r/up/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCookie: bridge_session={key_id}.{expiry}."
    r = send_raw(guarded.port, raw.encode() + "\u00e9".encode() + b"\r\n\r\n")
    assert r.status == 401, f"a non-ASCII cookie value: {r.status}"


def test_routes_under_r_receive_no_cookies_of_the_default_route(guarded: Relay) -> None:
    cookie = {"Cookie": f"bridge_session={login(guarded)}; token=webui-secret"}
    at_root = httpx.get(guarded.url + "/page", headers=cookie, timeout=30).json()["headers"]
    assert ("token", "webui-secret") in cookie_pairs(dict((k.lower(), v) for k, v in at_root)["cookie"])
    under_r = httpx.get(guarded.url + "/r/up/page", headers=cookie, timeout=30).json()["headers"]
    assert "webui-secret" not in json.dumps(under_r), "Open WebUI's session reached route `up`"
