"""Client WebSockets through the relay and the bridge (what Open WebUI's socket.io needs), with the
real ``websockets`` client against a real upstream WebSocket server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import Callable

import httpx
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from .procs import API_KEY, Bridge, Relay, gated_ticks, until

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def ws_url(relay: Relay, path: str) -> str:
    return relay.ws_url + path


async def test_text_binary_and_subprotocol_round_trip(stack: Relay) -> None:
    async with connect(
        ws_url(stack, "/r/up/ws/echo"),
        additional_headers=AUTH,
        subprotocols=[Subprotocol("x"), Subprotocol("chat")],
        max_size=None,
    ) as ws:
        assert ws.subprotocol == "chat"
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send("héllo ✓")
        assert await ws.recv() == "héllo ✓"
        blob = os.urandom(1_500_000)  # spans many DATA frames and flow-control windows
        await ws.send(blob)
        assert await ws.recv() == blob
        await ws.send(b"")
        assert await ws.recv() == b""


async def test_upstream_sees_rewritten_host_and_origin_and_no_relay_key(stack: Relay, upstream: str) -> None:
    headers = {**AUTH, "X-App": "kept"}
    async with connect(
        ws_url(stack, "/r/up/ws/echo"),
        additional_headers=headers,
        origin="https://relay.example",  # type: ignore[arg-type]
    ) as ws:
        await ws.send("headers?")
        seen = json.loads(await ws.recv())
    assert seen["host"] == upstream.removeprefix("http://")
    assert seen["origin"] == upstream
    assert seen["x-app"] == "kept"
    assert "authorization" not in seen
    assert API_KEY not in json.dumps(seen)


async def test_server_pushed_messages_arrive_at_once(stack: Relay, upstream: str) -> None:
    # The upstream pushes each next message only once the client has this one (tests/procs.py
    # release): a message held back on the way is a receive that times out.
    gate = f"ws-{uuid.uuid4().hex}"
    got = await gated_ticks(ws_url(stack, f"/r/up/ws/ticks?n=8&gate={gate}"), upstream, gate, AUTH)
    assert got.close_code == 1000 and got.close_reason == "done"
    assert got.seen == list(range(8))


async def test_close_code_and_reason_travel_from_the_upstream(stack: Relay) -> None:
    async with connect(ws_url(stack, "/r/up/ws/echo"), additional_headers=AUTH) as ws:
        await ws.send("close-me")
        with pytest.raises(websockets.ConnectionClosedError):
            await ws.recv()
    assert (ws.close_code, ws.close_reason) == (4001, "asked to")


async def test_handshake_without_a_key_is_refused_with_401(stack: Relay) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(stack, "/r/up/ws/echo")):
            pass
    assert info.value.response.status_code == 401


async def test_upstream_refusal_reaches_the_client_with_status_and_body(stack: Relay) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(ws_url(stack, "/r/up/ws/deny"), additional_headers=AUTH):
            pass
    assert info.value.response.status_code == 403
    assert info.value.response.body == b"denied: /ws/deny"


async def test_unknown_route_and_unreachable_upstream(stack: Relay) -> None:
    for path, status in (("/r/nope/ws/echo", 404), ("/r/dead/ws/echo", 502)):
        with pytest.raises(InvalidStatus) as info:
            async with connect(ws_url(stack, path), additional_headers=AUTH):
                pass
        assert info.value.response.status_code == status, path


async def test_browser_login_cookie_gates_the_upgrade(stack: Relay) -> None:
    async with httpx.AsyncClient(base_url=stack.url) as browser:
        r = await browser.post("/_relay/login", data={"key": API_KEY, "next": "/"})
        cookie = r.cookies["bridge_session"]
    async with connect(
        ws_url(stack, "/r/up/ws/echo"), additional_headers={"Cookie": f"bridge_session={cookie}"}
    ) as ws:
        await ws.send("via cookie")
        assert await ws.recv() == "via cookie"


async def test_many_websockets_at_once_beside_http(stack: Relay) -> None:
    async def chat(i: int) -> list[str]:
        async with connect(ws_url(stack, "/r/up/ws/echo"), additional_headers=AUTH) as ws:
            out = []
            for j in range(20):
                await ws.send(f"{i}:{j}")
                out.append(str(await ws.recv()))
            return out

    async with stack.aclient() as c:
        results, responses = await asyncio.gather(
            asyncio.gather(*(chat(i) for i in range(50))),
            asyncio.gather(*(c.get("/r/up/small") for _ in range(50))),
        )
    assert results == [[f"{i}:{j}" for j in range(20)] for i in range(50)]
    assert all(r.status_code == 200 for r in responses)
    until(lambda: stack.health()["websockets_open"] == 0, what="the relay to count the sockets closed")


async def test_bridge_killed_closes_client_websockets_promptly(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str
) -> None:
    relay = make_relay()
    bridge = make_bridge(relay, {"up": upstream})
    async with connect(ws_url(relay, "/r/up/ws/echo"), additional_headers=AUTH) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        bridge.proc.signal(signal.SIGKILL)
        with pytest.raises(websockets.ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1011
