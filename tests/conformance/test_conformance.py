"""The behaviour every relay must show (docs/spec/: wire.md and the core of relay.md), checked with
real clients (httpx, ollama, openai, websockets) through the real, unchanged Python bridge to the
stand-in upstream. Each test runs against the Python relay and against the Cloudflare relay under
workerd (``[cloudflare]``). The named extensions are tested in test_extensions.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from bridge import wire as p

from ..conftest import _assert_no_secret_logged
from ..procs import API_KEY, NODE_TOKEN, Bridge, Proc, Relay, bridge_cmd, gated_ticks, release, until
from ..upstreams import MODEL, REPLY, TOKEN_DELAY
from .conftest import SHORT_GRACE, start_relay

AUTH = {"Authorization": f"Bearer {API_KEY}"}
ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
#: Seconds of idleness after which workerd has evicted an idle Durable Object (measured: 10-25 s).
HIBERNATE_IDLE = 30.0


# ------------------------------------------------------------------------------------ auth


def test_client_key_is_required_and_checked(relay: Relay) -> None:
    with httpx.Client(base_url=relay.url, timeout=30) as c:
        r = c.get("/r/up/small")
        assert r.status_code == 401
        assert r.headers["www-authenticate"] == 'Bearer realm="bridge"'
        assert c.get("/r/up/small", headers={"Authorization": "Bearer bk_wrong_key"}).status_code == 401
        assert c.get("/r/up/small", headers={"X-Bridge-Key": "bk_wrong_key"}).status_code == 401
        assert c.get("/r/up/small", headers=AUTH).json()["ok"] is True
        assert c.get("/r/up/small", headers={"authorization": f"bearer {API_KEY}"}).status_code == 200
        assert c.get("/r/up/small", headers={"X-Bridge-Key": API_KEY}).status_code == 200
        r = c.get("/r/up/small?a=1", headers={"Accept": "text/html"})
        assert r.status_code == 303
        assert r.headers["location"] == "/_relay/login?next=%2Fr%2Fup%2Fsmall%3Fa%3D1"
        assert c.get("/_relay/status").status_code == 401


def test_login_cookie_opens_the_relay_to_a_browser(relay: Relay) -> None:
    with httpx.Client(base_url=relay.url, timeout=30) as browser:
        page = browser.get("/_relay/login?next=/r/up/small")
        assert page.status_code == 200 and 'name="key"' in page.text
        wrong = browser.post("/_relay/login", data={"key": "bk_nope", "next": "/r/up/small"})
        assert wrong.status_code == 401 and "bridge_session" not in wrong.cookies
        r = browser.post("/_relay/login", data={"key": API_KEY, "next": "/r/up/small"})
        assert r.status_code == 303 and r.headers["location"] == "/r/up/small"
        set_cookie = r.headers["set-cookie"]
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie and API_KEY not in set_cookie
        seen = browser.get("/r/up/headers").json()
        assert browser.get("/r/up/small").status_code == 200
        cookie = dict(seen["headers"]).get("cookie", "")
        assert "bridge_session" not in cookie, "the relay's own cookie must not reach the upstream"
        assert browser.get("/_relay/logout").status_code == 303


# ------------------------------------------------------------------------------------ endpoints


def test_health_reports_the_bridge_with_timestamps(relay: Relay) -> None:
    r = httpx.get(relay.url + "/_relay/health", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    health = r.json()
    assert health["status"] == "ok" and health["node_connected"] is True and health["nodes"] == 1
    assert ISO.match(health["connected_since"]) and ISO.match(health["last_connected_at"])
    assert health["protocol"] == 1
    for key in ("last_disconnected_at", "requests_in_flight", "requests_waiting", "draining", "version"):
        assert key in health
    with relay.client() as c:
        status = c.get("/_relay/status").json()
    assert [sorted(n["routes"]) for n in status["nodes_detail"]] == [["dead", "ollama", "up"]]
    assert status["default_route"] == "ollama"


def test_status_page_shows_the_bridge_to_a_logged_in_browser(relay: Relay) -> None:
    with httpx.Client(base_url=relay.url, timeout=30) as browser:
        r = browser.get("/_relay/", headers={"Accept": "text/html"})
        assert r.status_code == 303 and r.headers["location"].startswith("/_relay/login")
        assert browser.post("/_relay/login", data={"key": API_KEY, "next": "/_relay/"}).status_code == 303
        page = browser.get("/_relay/", headers={"Accept": "text/html"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "Private LLM relay" in page.text and "serving" in page.text
    with relay.client() as c:
        node = c.get("/_relay/status").json()["nodes_detail"][0]["node"]
    assert node in page.text and API_KEY not in page.text


def test_route_prefix_is_stripped_and_headers_rewritten(relay: Relay, upstream: str) -> None:
    with relay.client() as c:
        seen = c.get(
            "/r/up/headers?x=1&y=%2F", headers={"X-App": "kept", "X-Forwarded-For": "6.6.6.6"}
        ).json()
    with httpx.Client(base_url=relay.url, timeout=30) as c:
        by_header = dict(c.get("/r/up/headers", headers={"X-Bridge-Key": API_KEY}).json()["headers"])
    assert "x-bridge-key" not in by_header
    headers = dict(seen["headers"])
    assert headers["x-forwarded-for"] == "127.0.0.1"  # the client's own value is dropped
    assert (seen["path"], seen["raw_path"], seen["query"]) == ("/headers", "/headers", "x=1&y=%2F")
    assert headers["host"] == upstream.removeprefix("http://")
    assert headers["x-forwarded-prefix"] == "/r/up"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-app"] == "kept"
    assert "authorization" not in headers and API_KEY not in json.dumps(seen)


def test_default_route_serves_the_root(relay: Relay) -> None:
    with relay.client() as c:
        assert c.get("/api/tags").json()["models"][0]["name"] == MODEL
        seen = c.get("/headers").json()
        assert "x-forwarded-prefix" not in dict(seen["headers"])
        assert c.get("/r/nope/api/tags").status_code == 404
        assert c.get("/r/dead/small").status_code == 502


# ------------------------------------------------------------------------------------ streaming


def test_ndjson_streams_token_by_token_with_the_ollama_client(relay: Relay) -> None:
    client = ollama.Client(host=relay.url + "/r/ollama", headers=AUTH, timeout=30)
    arrivals: list[float] = []
    text = ""
    for part in client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
        arrivals.append(time.monotonic())
        text += part.message.content or ""
    assert text == REPLY
    tokens = len(REPLY.split(" "))
    # Buffered, every part would arrive at once; streamed, they are spaced like the upstream's tokens.
    assert arrivals[-1] - arrivals[0] >= 0.5 * TOKEN_DELAY * (tokens - 1), arrivals


def test_each_chunk_leaves_the_relay_as_it_arrives(relay: Relay, upstream: str) -> None:
    # The upstream writes each next line only after the client has read this one through the relay
    # (tests/procs.py release): a relay that buffers never delivers the first line (a read timeout).
    seen, gate = [], f"conf-{uuid.uuid4().hex}"
    with (
        relay.client(timeout=httpx.Timeout(30, read=20)) as c,
        c.stream("GET", f"/r/up/stream?n=5&gate={gate}") as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line:
                seen.append(json.loads(line)["i"])
                release(upstream, gate)
    assert seen == list(range(5))


def test_sse_streams_with_the_openai_client(relay: Relay) -> None:
    client = openai.OpenAI(base_url=relay.url + "/r/ollama/v1", api_key=API_KEY, timeout=30, max_retries=0)
    arrivals: list[float] = []
    text = ""
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    for chunk in stream:
        arrivals.append(time.monotonic())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    assert text == REPLY
    assert arrivals[-1] - arrivals[0] >= 0.5 * TOKEN_DELAY * (len(REPLY.split(" ")) - 1), arrivals
    assert [m.id for m in client.models.list()] == [MODEL]


def test_upload_and_download_of_several_megabytes(relay: Relay) -> None:
    body = os.urandom(5 * 1024 * 1024 + 123)  # many windows of credit each way
    with relay.client() as c:
        r = c.post("/r/up/sha256", content=body)
        assert r.status_code == 200
        assert r.json() == {"sha256": hashlib.sha256(body).hexdigest(), "length": len(body)}

        def chunks() -> Any:
            for i in range(0, len(body), 256 * 1024):
                yield body[i : i + 256 * 1024]

        r = c.post("/r/up/sha256", content=chunks())  # chunked: no Content-Length
        assert r.json()["sha256"] == hashlib.sha256(body).hexdigest()
        r = c.get("/r/up/bytes/3000000")
        block = bytes(range(256)) * 256
        assert r.status_code == 200 and r.content == (block * 46)[:3000000]


# ------------------------------------------------------------------------------------ no bridge


def test_no_bridge_gets_503_with_retry_after_after_the_grace(bare_relay: Relay) -> None:
    started = time.monotonic()
    with bare_relay.client() as c:
        r = c.get("/r/up/small")
    waited = time.monotonic() - started
    assert r.status_code == 503 and r.headers["retry-after"] == "10"
    assert "no bridge" in r.json()["error"]
    assert waited >= SHORT_GRACE - 0.5, waited
    health = bare_relay.health()
    assert health["node_connected"] is False and health["status"] == "no_node"


def test_held_request_is_served_when_a_bridge_connects(
    bare_relay: Relay, bridges: Callable[..., Bridge], upstream: str
) -> None:
    result: dict[str, httpx.Response] = {}

    def request() -> None:
        with bare_relay.client() as c:
            result["r"] = c.get("/r/up/small")

    thread = threading.Thread(target=request)
    thread.start()
    until(lambda: bare_relay.health()["requests_waiting"] == 1, what="the request to be held")
    bridges(bare_relay, {"up": upstream})
    thread.join(30)
    assert result["r"].status_code == 200 and result["r"].json()["ok"] is True
    health = bare_relay.health()
    assert health["node_connected"] is True and ISO.match(health["last_connected_at"])


def test_bridge_leaving_is_recorded_and_a_wrong_token_is_refused(
    bare_relay: Relay, bridges: Callable[..., Bridge], upstream: str
) -> None:
    bridge = bridges(bare_relay, {"up": upstream})
    bridge.proc.signal(signal.SIGKILL)
    until(lambda: bare_relay.health()["last_disconnected_at"] is not None, 30, "the disconnect")
    assert bare_relay.health()["node_connected"] is False
    wrong = Proc(
        bridge_cmd(
            "connect",
            "--relay",
            bare_relay.ws_url,
            "--node-token",
            "not-the-token",
            "--route",
            "a=" + upstream,
        ),
        "bridge-wrong-token",
    )
    try:
        assert wrong.wait(30) != 0, "a refused bridge must exit, not retry"
        assert "wrong node token" in wrong.output
        assert "not-the-token" not in bare_relay.proc.output and NODE_TOKEN not in wrong.output
    finally:
        wrong.stop()


def test_bridge_lost_mid_response_breaks_the_body(
    bare_relay: Relay, bridges: Callable[..., Bridge], upstream: str
) -> None:
    """A response cut by a dead bridge must end as an error, never hang nor look complete."""
    bridge = bridges(bare_relay, {"up": upstream})
    # identity: Cloudflare (and wrangler dev, imitating it) gzips text/plain for clients that accept it
    with (
        bare_relay.client() as c,
        c.stream("GET", "/r/up/hang?head=1", headers={"Accept-Encoding": "identity"}) as r,
    ):
        assert r.status_code == 200
        chunks = r.iter_raw()
        assert next(chunks) == b"partial"
        bridge.proc.signal(signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(httpx.TransportError):
            for _ in chunks:
                pass
    assert time.monotonic() - started < 15


def test_silent_bridge_is_dropped_after_three_heartbeats(
    bare_relay: Relay, bridges: Callable[..., Bridge], upstream: str
) -> None:
    bridge = bridges(bare_relay, {"up": upstream})
    bridge.proc.signal(signal.SIGSTOP)  # alive but silent: no TCP close, only missing pings
    try:
        until(lambda: not bare_relay.health()["node_connected"], 20, "the relay to drop the silent bridge")
    finally:
        bridge.proc.signal(signal.SIGCONT)
    until(lambda: bare_relay.health()["node_connected"], 30, "the bridge to reconnect")
    with bare_relay.client() as c:
        assert c.get("/r/up/small").status_code == 200


def test_client_going_away_mid_stream_frees_the_request(relay: Relay) -> None:
    """The relay sends RESET CANCEL to the bridge and stops counting the request in flight."""
    with relay.client() as c, c.stream("GET", "/r/up/stream?n=200&interval=0.05") as r:
        assert r.status_code == 200
        lines = r.iter_lines()  # kept: a dropped iterator would close the response at once
        assert json.loads(next(lines))["i"] == 0
        assert relay.health()["requests_in_flight"] == 1
    until(lambda: relay.health()["requests_in_flight"] == 0, 10, "the request to be dropped")
    with relay.client() as c:
        assert c.get("/r/up/small").json()["ok"] is True


async def _handshake(relay: Relay, *messages: bytes | str) -> tuple[list[bytes | str], int | None]:
    """Send raw messages on /_relay/connect; return what came back until the relay closed."""
    got: list[bytes | str] = []
    async with connect(relay.ws_url + "/_relay/connect", compression=None) as ws:
        for m in messages:
            await ws.send(m)
        with contextlib.suppress(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                async for reply in ws:
                    got.append(reply)
                    if reply == "pong" and len(got) == len([m for m in messages if m == "ping"]):
                        break
    return got, ws.close_code


def _hello(**fields: Any) -> bytes:
    body = {"version": 1, "token": NODE_TOKEN, "node": "raw", "routes": ["up"], **fields}
    return p.encode_frame(p.FrameType.HELLO, 0, 0, json.dumps(body).encode())


def _goaway(message: bytes | str) -> dict[str, Any]:
    assert isinstance(message, bytes), message
    [frame] = list(p.iter_frames(message))
    assert (frame.type, frame.stream_id) == (p.FrameType.GOAWAY, 0)
    body: dict[str, Any] = json.loads(frame.payload)
    return body


async def test_handshake_refusals_follow_the_protocol(bare_relay: Relay) -> None:
    """docs/spec/wire.md sections 2 and 5: GOAWAY first, then the close code; ping before HELLO."""
    got, _ = await _handshake(bare_relay, "ping")
    assert got == ["pong"]
    got, code = await _handshake(bare_relay, _hello(version=2))
    assert _goaway(got[0])["code"] == p.ErrorCode.UNSUPPORTED_VERSION and code == 1002
    got, code = await _handshake(bare_relay, _hello(token="wrong"))
    assert _goaway(got[0]) == {
        "code": p.ErrorCode.UNAUTHORIZED,
        "reason": "wrong node token",
        "last_stream_id": 0,
    }
    assert code == 4401
    got, code = await _handshake(bare_relay, b"\x00\x00\x05")  # a truncated frame header
    assert _goaway(got[0])["code"] == p.ErrorCode.PROTOCOL_ERROR and code == 1002
    # accepted: WELCOME with the relay's heartbeat, then GOAWAY PROTOCOL_ERROR for an OPEN
    async with connect(bare_relay.ws_url + "/_relay/connect", compression=None) as ws:
        await ws.send(_hello())
        [frame] = list(p.iter_frames(await ws.recv()))  # type: ignore[arg-type]
        welcome = json.loads(frame.payload)
        assert frame.type == p.FrameType.WELCOME and welcome["version"] == 1 and welcome["heartbeat"] == 1
        await ws.send(p.encode_frame(p.FrameType.OPEN, 0, 1, b"{}"))
        assert _goaway(await ws.recv())["code"] == p.ErrorCode.PROTOCOL_ERROR
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10)
    assert ws.close_code == 1002


# ------------------------------------------------------------------------------------ WebSockets


async def test_client_websocket_echo(relay: Relay) -> None:
    async with connect(
        relay.ws_url + "/r/up/ws/echo",
        additional_headers=AUTH,
        subprotocols=[Subprotocol("x"), Subprotocol("chat")],
        max_size=None,
    ) as ws:
        assert ws.subprotocol == "chat"
        for text in ("hello", "héllo ✓", "ping"):  # "ping" too: the client's text, not a heartbeat
            await ws.send(text)
            assert await ws.recv() == text
        blob = os.urandom(700_000)  # spans DATA frames and flow-control windows
        await ws.send(blob)
        assert await ws.recv() == blob
        await ws.send("close-me")
        with pytest.raises(websockets.ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), 10)
    assert (ws.close_code, ws.close_reason) == (4001, "asked to")


async def test_client_websocket_needs_a_key_and_shows_refusals(relay: Relay) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(relay.ws_url + "/r/up/ws/echo"):
            pass
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        async with connect(relay.ws_url + "/r/up/ws/deny", additional_headers=AUTH):
            pass
    assert info.value.response.status_code == 403
    assert info.value.response.body == b"denied: /ws/deny"


async def test_server_pushed_websocket_messages_arrive_at_once(relay: Relay, upstream: str) -> None:
    # The upstream pushes each next message only once the client has this one (tests/procs.py
    # release): a message held back on the way is a receive that times out.
    gate = f"conf-ws-{uuid.uuid4().hex}"
    got = await gated_ticks(relay.ws_url + f"/r/up/ws/ticks?n=6&gate={gate}", upstream, gate, AUTH)
    assert got.close_code == 1000 and got.seen == list(range(6))


def test_health_timestamps_survive_a_relay_restart(
    bare_relay: Relay, bridges: Callable[..., Bridge], upstream: str
) -> None:
    """Python: SQLite in --data-dir; Cloudflare: the Durable Object's storage (wrangler --persist-to)."""
    bridge = bridges(bare_relay, {"up": upstream})
    bridge.proc.signal(signal.SIGKILL)
    until(lambda: bare_relay.health()["last_disconnected_at"] is not None, 30, "the disconnect")
    before = bare_relay.health()
    assert ISO.match(before["last_connected_at"]) and ISO.match(before["last_disconnected_at"])
    bare_relay.restart()
    after = bare_relay.health()
    assert after["node_connected"] is False and after["connected_since"] is None
    assert (after["last_connected_at"], after["last_disconnected_at"]) == (
        before["last_connected_at"],
        before["last_disconnected_at"],
    )


# ------------------------------------------------------------------------------------ hibernation


@pytest.mark.workerd
def test_bridge_survives_the_durable_object_hibernating(
    upstream: str, tmp_path: Path, bridges: Callable[..., Bridge]
) -> None:
    """Cloudflare only: a Durable Object is evicted from memory when idle (the Python relay never
    is). The bridge's hibernatable WebSocket must stay open, its pings answered by the auto-response
    while the object sleeps, and the rebuilt object must know the bridge again from the socket's
    attachment: same session, stream ids still increasing (the bridge drops the link otherwise)."""
    # heartbeat 20: the watchdog alarm (3 x heartbeat) must not wake the object during the idle time
    relay = start_relay("cloudflare", tmp_path / "relay", heartbeat=20)
    try:
        # no STATS samples: each one is a message that wakes the object (every 5 s by default)
        bridge = bridges(relay, {"up": upstream}, "--sample-interval", "0")
        cold = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "options": {"temperature": 0},
        }
        with relay.client() as c:
            for _ in range(3):
                assert c.get("/r/up/small").status_code == 200
            # what must outlive the object's memory (src/store.ts): an answer kept for repeats, a
            # job's result, the models the node listed
            first = c.post("/r/up/api/chat", json=cold)
            assert first.headers["x-bridge-idempotent"] == "new"
            job = c.post("/_relay/jobs", json={"route": "up", "path": "/api/chat", "body": cold}).json()
            assert c.get(job["url"], params={"wait": 30}).json()["state"] == "done"
            until(
                lambda: c.get("/_relay/status").json()["nodes_detail"][0]["models"] == [MODEL], 20, "models"
            )
            before = c.get("/_relay/status").json()
        # Idle on purpose: any request would keep the object in memory. workerd evicts an idle
        # object after about 10-25 s; the bridge pings (auto-answered) every 20 s meanwhile.
        mark = relay.proc.mark()
        time.sleep(HIBERNATE_IDLE)
        with relay.client() as c:
            after = c.get("/_relay/status").json()
            assert after["uptime_s"] < HIBERNATE_IDLE, "the object was not evicted: nothing tested"
            relay.proc.wait_for(r"relay object started with 1 bridge socket", 10, start=mark)
            assert [n["session"] for n in after["nodes_detail"]] == [
                n["session"] for n in before["nodes_detail"]
            ]
            assert after["connected_since"] == before["connected_since"]
            for _ in range(3):
                assert c.get("/r/up/small").json()["ok"] is True
            assert c.post("/r/up/sha256", content=b"x" * 300_000).json()["length"] == 300_000
            assert [n["models"] for n in after["nodes_detail"]] == [[MODEL]]
            again = c.post("/r/up/api/chat", json=cold)
            assert again.headers["x-bridge-idempotent"] == "replayed" and again.content == first.content
            assert c.get(job["url"]).json()["state"] == "done"
        assert relay.health()["node_connected"] is True
        sessions = [line for line in bridge.proc.lines if "connected to " in line]
        assert len(sessions) == 1, "the bridge had to reconnect:\n" + bridge.proc.output[-3000:]
        _assert_no_secret_logged(relay.proc, bridge.proc)
    finally:
        relay.proc.stop()
