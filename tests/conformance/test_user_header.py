"""The one login's relay side (issue 17): on its user route (the default route unless
``--user-route``/``USER_ROUTE`` says otherwise) a relay tells the upstream who the client is, from the
key it authenticated: ``X-Bridge-User-Email: <key id>@relay.invalid`` and ``X-Bridge-User-Name``, which
Open WebUI's trusted-header sign-in believes. A client's own ``X-Bridge-User-*`` headers are dropped
on every route and every path (HTTP, WebSocket upgrades, jobs): a client cannot become someone else.

Run against the Python relay and the Cloudflare relay under workerd, through the real bridge to the
scripted upstream (tests/scripted_upstream.py), which echoes the headers it got.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import websockets

from ..procs import API_KEY, Relay
from .conftest import RELAYS, scripted_relay

PLANTED = {
    "X-Bridge-User-Email": "admin@localhost",
    "X-Bridge-User-Name": "Admin",
    "x-bridge-user-role": "admin",
}
KEY_HASH = hashlib.sha256(API_KEY.encode()).hexdigest()


@pytest.fixture(scope="module", params=RELAYS)
def relay(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay of each kind; its default route ``app`` and route ``up`` lead to the scripted upstream."""
    with scripted_relay(request.param, tmp_path_factory.mktemp(f"user-{request.param}")) as relay:
        yield relay


def users(headers: list[list[str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers if k.lower().startswith("x-bridge-user-")}


def expected_email(headers: dict[str, str]) -> str:
    """The address the relay made: the key's id (the Python relay's ``env-`` and 8 hex digits of the
    key's SHA-256 for a key from BRIDGE_API_KEYS; the Cloudflare relay's 16) at relay.invalid."""
    email = headers.get("x-bridge-user-email", "")
    local, _, domain = email.partition("@")
    assert domain == "relay.invalid" and local.removeprefix("env-") in KEY_HASH[:16], email
    return email


@pytest.mark.extension("user-header")
def test_the_user_route_gets_the_keys_user_and_no_client_can_name_another(relay: Relay) -> None:
    login = httpx.post(relay.url + "/_relay/login", data={"key": API_KEY, "next": "/"}, timeout=30)
    assert login.status_code == 303
    cookie = {"Cookie": f"bridge_session={login.cookies['bridge_session']}"}
    seen: list[dict[str, str]] = []
    for auth in ({"Authorization": f"Bearer {API_KEY}"}, {"X-Bridge-Key": API_KEY}, cookie):
        r = httpx.get(relay.url + "/who", headers={**auth, **PLANTED}, timeout=30)
        assert r.status_code == 200, r.text
        got = users(r.json()["headers"])
        seen.append(got)
        assert set(got) == {"x-bridge-user-email", "x-bridge-user-name"}, got
        assert "admin" not in json.dumps(got).lower(), f"a planted header got through: {got}"
    # The same key is the same user, however it is presented.
    assert seen[0] == seen[1] == seen[2]
    expected_email(seen[0])
    # Another route gets no identity at all, and none of the client's.
    r = httpx.get(relay.url + "/r/up/who", headers={"X-Bridge-Key": API_KEY, **PLANTED}, timeout=30)
    assert users(r.json()["headers"]) == {}, r.json()["headers"]
    # Without a key nothing reaches the upstream, planted headers or not.
    assert httpx.get(relay.url + "/who", headers=PLANTED, timeout=30).status_code == 401


@pytest.mark.extension("user-header")
async def test_websocket_upgrades_carry_the_relays_user_only(relay: Relay) -> None:
    async def handshake(path: str) -> dict[str, str]:
        async with websockets.connect(
            relay.ws_url + path, additional_headers={"X-Bridge-Key": API_KEY, **PLANTED}
        ) as ws:
            report: dict[str, Any] = json.loads(await ws.recv())
        return users(report["headers"])

    at_root = await handshake("/ws/echo")
    assert expected_email(at_root) and "admin" not in json.dumps(at_root).lower(), at_root
    assert await handshake("/r/up/ws/echo") == {}


@pytest.mark.extension("user-header")
def test_jobs_carry_the_relays_user_only(relay: Relay) -> None:
    client = httpx.Client(base_url=relay.url, headers={"X-Bridge-Key": API_KEY}, timeout=30)
    for route, expect_user in (("app", True), ("up", False)):
        r = client.post(
            "/_relay/jobs", json={"route": route, "method": "GET", "path": "/who", "headers": PLANTED}
        )
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        deadline = time.monotonic() + 30
        while (state := client.get(f"/_relay/jobs/{job}", params={"wait": 10}).json())["state"] == "running":
            assert time.monotonic() < deadline, state
        got = users(json.loads(state["response"]["body"])["headers"])
        if expect_user:
            assert expected_email(got) and "admin" not in json.dumps(got).lower(), got
        else:
            assert got == {}, got
