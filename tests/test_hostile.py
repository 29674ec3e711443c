"""Hostile input against a real relay and bridge on loopback: requests that try to reach an address
no route names, request smuggling and hop-by-hop abuse, wrong and guessed credentials, a second
bridge with a stolen session, oversized heads and bodies, slowloris and never-reading clients, and
a malicious relay fuzzing a real bridge. Every test checks what an attacker would want and does not
get: a connection to a canary listener that no route names, a secret in a log line or an error
body, a crash, or memory and connections held without bound."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import websockets

from bridge import wire as p
from bridge.ratelimit import FailureLimiter
from bridge.relay import auth
from bridge.relay.auth import KeyRing
from bridge.relay.server import _RESPONSE_431 as RESPONSE_431
from bridge.relay.store import Store

from .procs import API_KEY, NODE_TOKEN, Bridge, Relay, until

MakeRelay = Callable[..., Relay]
MakeBridge = Callable[..., Bridge]
AUTH = f"Authorization: Bearer {API_KEY}\r\n".encode()
#: Wrong keys presented in these tests: they must appear in no log line either (a wrong key is
#: often someone's right key for another service).
WRONG_KEYS = [f"bk_deadbeef_wrong-key-{i:02d}-must-never-be-logged" for i in range(12)]


class Canary:
    """A TCP listener no route names: any connection to it means a request escaped its route."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.hits = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.hits += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def canary() -> Iterator[Canary]:
    c = Canary()
    yield c
    c.close()


@pytest.fixture(scope="module")
def hostile(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """A relay (default route ``up``) and a bridge with routes ``up`` and ``dead`` (nothing listens)."""
    relay = Relay(tmp_path_factory.mktemp("hostile"), "--default-route", "up", "--max-body", "1000000")
    bridge = Bridge(relay, {"up": upstream, "dead": "http://127.0.0.1:9"})
    relay.bridge_pid = bridge.proc.popen.pid
    yield relay
    bridge.stop()
    relay.proc.stop()
    for proc in (relay.proc, bridge.proc):
        for secret in (API_KEY, NODE_TOKEN, API_KEY.split("_")[-1], *WRONG_KEYS):
            assert secret not in proc.output, f"{proc.name} logged a secret"


async def raw(port: int, data: bytes, timeout: float = 10.0, source: str = "127.0.0.1") -> bytes:
    """Send bytes as they are and read until the server closes (the requests say Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    with contextlib.suppress(ConnectionError):  # the server may answer and close before all is sent
        writer.write(data)
        await writer.drain()
    out = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), timeout):
            out += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return out


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def body_json(response: bytes) -> Any:
    head, _, body = response.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" in head.lower():
        out = b""
        while body:
            size_line, _, rest = body.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            body = rest[size + 2 :]
        body = out
    return json.loads(body)


def request(line: str, *headers: str, body: bytes = b"", auth: bool = True) -> bytes:
    head = line.encode() + b"\r\nHost: relay.example\r\n" + (AUTH if auth else b"")
    head += b"".join(h.encode("latin-1") + b"\r\n" for h in headers)
    return head + b"Connection: close\r\n\r\n" + body


# ---------------------------------------------------------------------------- addressing


async def test_no_request_reaches_an_address_the_client_names(hostile: Relay, canary: Canary) -> None:
    c = f"127.0.0.1:{canary.port}"
    # Each with the one answer it gets: served by the route's own upstream (200), an unknown route or
    # the upstream's own 404, or a request the server refuses to parse (400).
    attempts = {
        "absolute-form URI": (request(f"GET http://{c}/r/up/headers HTTP/1.1"), 200),
        "absolute-form at the root": (request(f"GET http://{c}/headers HTTP/1.1"), 200),
        "Host header": (request("GET /r/up/headers HTTP/1.1", f"Host: {c}"), 200),
        "forwarding headers": (
            request("GET /r/up/headers HTTP/1.1", f"X-Forwarded-Host: {c}", f"Forwarded: host={c}"),
            200,
        ),
        "scheme-relative target": (request(f"GET //{c}/headers HTTP/1.1"), 404),  # the upstream's
        "address as route": (request(f"GET /r/{c}/headers HTTP/1.1"), 404),
        "userinfo in route": (request(f"GET /r/up@{c}/headers HTTP/1.1"), 404),
        "encoded URL as route": (request(f"GET /r/http:%2F%2F{c}/headers HTTP/1.1"), 404),
        "userinfo target": (request(f"GET @{c}/ HTTP/1.1"), 400),
        "CONNECT": (request(f"CONNECT {c} HTTP/1.1"), 400),
    }
    for what, (data, expected) in attempts.items():
        response = await raw(hostile.port, data)
        status = status_of(response)
        assert status == expected, f"{what}: {response[:200]!r}"
        if status == 404:
            assert b"unknown route" in response or b'"path": "//' in response, f"{what}: {response[:300]!r}"
        if status == 200:  # served by the route's own upstream, which saw its own Host
            seen = body_json(response)
            assert seen["path"] == "/headers", what
            host = dict(seen["headers"])["host"]
            assert host != c and host.startswith("127.0.0.1:"), f"{what}: upstream saw Host {host}"
    assert canary.hits == 0, "a request reached an address no route names"


async def test_path_traversal_and_encoded_forms_stay_inside_their_route(hostile: Relay) -> None:
    relay_404 = {"error": "unknown route"}
    cases = {
        # Route names that are not plain names: refused by the relay.
        "/r/%2e%2e/dead/x": relay_404,
        "/r/./up/x": relay_404,
        "/r/../r/dead/x": relay_404,
        "/r/u%70/x": relay_404,
        "/r/up%2F..%2Fdead/x": relay_404,
        "/r/%75p/x": relay_404,
    }
    for target, expected in cases.items():
        response = await raw(hostile.port, request(f"GET {target} HTTP/1.1"))
        assert status_of(response) == 404, target
        assert body_json(response) == expected, target
    # Dots after the route name are the upstream's business: they reach route `up` (whose upstream
    # answers 404), never route `dead` (whose upstream does not exist: 502).
    for target in ("/r/up/../dead/x", "/r/up/%2e%2e/dead/x", "/r/up/..%2F..%2Fdead", "/r/up/./../../dead"):
        response = await raw(hostile.port, request(f"GET {target} HTTP/1.1"))
        assert status_of(response) == 404, f"{target}: {response[:300]!r}"
        assert body_json(response)["error"] == "not found", target  # the upstream's own 404
        assert b"x-bridge-node" in response.lower()


# ---------------------------------------------------------------------------- smuggling, hop-by-hop


async def test_smuggling_shapes_are_refused_before_anything_is_forwarded(hostile: Relay) -> None:
    smuggled = request("GET /r/up/status/418 HTTP/1.1").decode()
    shapes = {
        "TE and CL": ("Content-Length: 4", "Transfer-Encoding: chunked"),
        "two CLs": ("Content-Length: 4", "Content-Length: 5"),
        "TE chunked, identity": ("Transfer-Encoding: chunked, identity",),
        "TE with space before colon": ("Transfer-Encoding : chunked",),
        "TE obs-fold": ("Transfer-Encoding:\r\n chunked",),
        "CL with sign": ("Content-Length: +5",),
    }
    for what, headers in shapes.items():
        data = request(
            "POST /r/up/sha256 HTTP/1.1", *headers, body=b"5\r\nhello\r\n0\r\n\r\n" + smuggled.encode()
        )
        response = await raw(hostile.port, data)
        assert status_of(response) == 400, f"{what}: {response[:200]!r}"
        assert b"418" not in response, f"{what}: the smuggled request was served"
    for what, line in {
        "NUL in a header": "X-A: a\x00b",
        "bare LF": "X-A: a\nX-B: b",
    }.items():
        response = await raw(hostile.port, request("GET /r/up/small HTTP/1.1", line))
        assert status_of(response) == 400, what


async def test_hop_by_hop_and_upgrade_abuse_never_reach_the_upstream(hostile: Relay) -> None:
    response = await raw(
        hostile.port,
        request(
            "GET /r/up/headers HTTP/1.1",
            "Connection: Upgrade, HTTP2-Settings, X-Forwarded-For, X-Internal",
            "Upgrade: h2c",
            "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
            "X-Forwarded-For: 6.6.6.6",
            "X-Internal: 1",
            "Keep-Alive: timeout=999",
            "Proxy-Authorization: Basic c2VjcmV0",
            "TE: trailers",
        ),
    )
    assert status_of(response) == 200, response[:200]  # a plain answer, not 101
    seen = {k.lower(): v for k, v in body_json(response)["headers"]}
    for name in ("upgrade", "http2-settings", "x-internal", "keep-alive", "proxy-authorization", "te"):
        assert name not in seen, f"{name} reached the upstream"
    # Naming X-Forwarded-For in Connection cannot remove or spoof the relay's own.
    assert seen["x-forwarded-for"] == "127.0.0.1"
    # An upgrade to WebSocket on a request that is not a WebSocket handshake: served as plain HTTP
    # with the upgrade stripped; never switched.
    for extra in ((), ("Content-Length: 0",)):
        response = await raw(
            hostile.port,
            request("POST /r/up/headers HTTP/1.1", "Connection: Upgrade", "Upgrade: websocket", *extra),
        )
        assert status_of(response) == 200, response[:200]
        names = {k.lower() for k, _ in body_json(response)["headers"]}
        assert "upgrade" not in names and "connection" not in names


# ---------------------------------------------------------------------------- authentication


async def test_missing_wrong_and_misplaced_keys_are_401_and_never_echoed(hostile: Relay) -> None:
    async with httpx.AsyncClient(base_url=hostile.url) as c:
        wrong = WRONG_KEYS[0]
        for headers, params in (
            ({}, {}),
            ({"Authorization": f"Bearer {wrong}"}, {}),
            ({"X-Bridge-Key": wrong}, {}),
            ({"Authorization": f"Basic {wrong}"}, {}),
            ({}, {"key": API_KEY}),  # keys in URLs end up in logs: not accepted
            ({"Cookie": f"bridge_session={wrong}"}, {}),
        ):
            r = await c.get("/r/up/small", headers=headers, params=params)
            assert r.status_code == 401, (headers, params)
            assert r.headers["www-authenticate"].startswith("Bearer")
            assert wrong not in r.text and API_KEY not in r.text


def test_key_checks_compare_every_known_hash_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A presented key is hashed, then compared with hmac.compare_digest against every known hash,
    with no early exit: so a refusal takes the same time whatever the guess shares with a real key.

    (A timing probe cannot fail here: the key is hashed before the compare, so even a plain ``==``
    on the digests leaks nothing measurable. This checks the compare itself: a ``==``, an early
    exit or a compare on the raw key fails it.)"""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)  # the module bridge/relay/auth.py calls it on
    others = ["bk_other001_" + "a" * 32, "bk_other002_" + "b" * 32]
    with tempfile.TemporaryDirectory() as tmp:
        ring = KeyRing(Store(Path(tmp)), [API_KEY, *others])
        known = {auth.hash_key(k) for k in (API_KEY, *others)}
        near = API_KEY[:-1] + ("x" if API_KEY[-1] != "x" else "y")
        for guess, expected in ((API_KEY, f"env-{auth.hash_key(API_KEY)[:8]}"), (near, None), ("z", None)):
            calls.clear()
            assert ring.check(guess) == expected
            # One compare per known key (the match found first or last alike), each of the guess's
            # digest with a stored digest: never the raw key.
            assert len(calls) == len(known), calls
            assert {a for a, _ in calls} == {auth.hash_key(guess)}
            assert {b for _, b in calls} == known


async def test_brute_force_from_one_address_is_429_and_others_are_served(make_relay: MakeRelay) -> None:
    """docs/security.md §7: wrong keys from one address get 429 once over the limit; the credential
    is checked first, so a right key (or login) from that address is still accepted."""
    relay = make_relay("--grace", "0.1")
    attacker = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(base_url=relay.url, transport=attacker) as c:
        codes = [
            (await c.get("/r/up/small", headers={"Authorization": f"Bearer {key}"})).status_code
            for key in WRONG_KEYS[:10]
        ]
        assert codes == [401] * 10
        r = await c.get("/r/up/small", headers={"X-Bridge-Key": WRONG_KEYS[10]})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        wrong_login = await c.post("/_relay/login", data={"key": WRONG_KEYS[11]})
        assert wrong_login.status_code == 429 and int(wrong_login.headers["retry-after"]) >= 1
        # The right key is accepted from the limited address (503: past authentication, no bridge),
        # and so is a login with it.
        r = await c.get("/r/up/small", headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 503
        assert (await c.post("/_relay/login", data={"key": API_KEY})).status_code == 303
    # A client WebSocket: a wrong key from the limited address gets 429, the right key gets past
    # authentication (503: no bridge).
    for key, status in ((WRONG_KEYS[0], 429), (API_KEY, 503)):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(
                relay.ws_url + "/r/up/ws",
                additional_headers={"Authorization": f"Bearer {key}"},
                local_addr=("127.0.0.2", 0),
            ):
                pass
        assert refused.value.response.status_code == status
    # Another address is not limited (here 127.0.0.1: a wrong key is 401, not 429).
    async with httpx.AsyncClient(base_url=relay.url) as c:
        r = await c.get("/r/up/small", headers={"Authorization": f"Bearer {WRONG_KEYS[0]}"})
        assert r.status_code == 401
        # X-Forwarded-For from a peer not configured with --trusted-proxy is not believed: the
        # guesser below is counted as 127.0.0.1, whatever address it names.
        for i, key in enumerate(WRONG_KEYS[1:10]):
            headers = {"X-Forwarded-For": f"203.0.113.{i}", "Authorization": f"Bearer {key}"}
            assert (await c.get("/r/up/small", headers=headers)).status_code == 401
        r = await c.get("/r/up/small", headers={"X-Forwarded-For": "198.51.100.7", "X-Bridge-Key": "bk_x"})
        assert r.status_code == 429


def test_failure_limiter_forgets_old_failures_and_stays_bounded() -> None:
    limiter = FailureLimiter(limit=3, window=60, max_addresses=100)
    for i in range(3):
        assert limiter.retry_after("a", now=100.0 + i) == 0
        limiter.failed("a", now=100.0 + i)
    assert limiter.retry_after("a", now=103.0) == 57  # until the oldest failure is a minute old
    assert limiter.retry_after("a", now=160.5) == 0  # one failure left the window: one more guess
    assert limiter.retry_after("b", now=103.0) == 0
    for i in range(10_000):  # an attacker with many addresses cannot grow it without bound
        limiter.failed(f"10.0.{i // 256}.{i % 256}", now=200.0)
    assert len(limiter) <= 100


async def _hello(relay: Relay, token: str, node: str) -> tuple[list[p.Event], int]:
    """A hand-made bridge: HELLO with ``token``; the events it got back and the close code."""
    conn = p.Connection(p.Role.BRIDGE)
    events: list[p.Event] = []
    async with websockets.connect(relay.ws_url + "/_relay/connect") as ws:
        conn.send_hello(token, node, ["up"])
        for hello in conn.data_to_send():
            await ws.send(hello)
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    events += conn.receive(message)
        except websockets.ConnectionClosed:
            pass
    return events, ws.close_code or 0


async def test_missing_or_wrong_node_token_and_a_stolen_session_are_refused(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    relay = make_relay()
    make_bridge(relay, {"up": upstream}, "--node-name", "victim")
    async with httpx.AsyncClient(base_url=relay.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        status = (await c.get("/_relay/status")).json()
        session = status["nodes_detail"][0]["session"]
        for token in ("", NODE_TOKEN[:-1], session, f"{NODE_TOKEN} "):
            # The intruder knows the victim's name and session id (they are shown on the status
            # page) but not the node token: the session id is no credential.
            events, code = await _hello(relay, token, "victim")
            assert code == 4401, token
            assert any(isinstance(e, p.GoAwayReceived) and e.code == p.ErrorCode.UNAUTHORIZED for e in events)
            assert not any(isinstance(e, p.WelcomeReceived) for e in events)
        after = (await c.get("/_relay/status")).json()
        assert [n["session"] for n in after["nodes_detail"]] == [session]
        assert (await c.get("/r/up/small")).status_code == 200


async def test_forged_and_tampered_cookies_are_refused(hostile: Relay) -> None:
    async with httpx.AsyncClient(base_url=hostile.url) as c:
        r = await c.post("/_relay/login", data={"key": API_KEY, "next": "/"})
        cookie = r.cookies["bridge_session"]
        key_id, expiry, mac = cookie.rsplit(".", 2)
        c.cookies.clear()
        assert (await c.get("/r/up/small", headers={"Cookie": f"bridge_session={cookie}"})).status_code == 200
        for forged in (
            f"{key_id}.{int(expiry) + 10**6}.{mac}",  # a later expiry
            f"env-00000000.{expiry}.{mac}",  # another key's id
            f"{key_id}.{expiry}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",  # a guessed MAC
            f"{key_id}.{int(time.time()) - 10}.{mac}",  # expired
        ):
            assert (
                await c.get("/r/up/small", headers={"Cookie": f"bridge_session={forged}"})
            ).status_code == 401


# ---------------------------------------------------------------------------- limits


async def test_oversized_heads_get_431_without_being_buffered(hostile: Relay) -> None:
    pid = hostile.proc.popen.pid
    before = psutil.Process(pid).memory_info().rss
    # One huge header, and many headers that are each small: 431 either way.
    assert (
        status_of(await raw(hostile.port, request("GET /r/up/small HTTP/1.1", "X-Big: " + "a" * 70_000)))
        == 431
    )
    many = [f"X-H{i}: " + '"' * 500 for i in range(115)]  # fits the server, not the tunnel's header block
    assert status_of(await raw(hostile.port, request("GET /r/up/small HTTP/1.1", *many))) == 431
    # A head that never ends: refused after the first 64 KiB, long before the 20 MiB are sent.
    mark = hostile.proc.mark()
    reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
    writer.write(b"GET /r/up/small HTTP/1.1\r\nHost: x\r\n")
    sent = 0
    with pytest.raises(ConnectionError):
        while sent < 20 << 20:
            writer.write(b"X-Filler: " + b"f" * 1000 + b"\r\n")
            sent += 1012
            await asyncio.wait_for(writer.drain(), 10)
    answer = b""
    with contextlib.suppress(ConnectionError):
        answer = await reader.read()
    writer.close()
    assert sent < 8 << 20
    # The relay refused it for its size (it says so, once); its 431 reaches the client unless the
    # client's own sending turned the close into a reset, which discards what was not yet read.
    hostile.proc.wait_for(r"refusing a request head over 65536 bytes", 10, start=mark)
    assert "\n".join(hostile.proc.lines[mark:]).count("refusing a request head over") == 1
    assert answer in (b"", RESPONSE_431), answer[:200]
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 16 << 20, f"relay grew by {grown >> 20} MiB on oversized heads"


async def test_oversized_body_is_413_before_it_is_sent(hostile: Relay) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
    writer.write(request("POST /r/up/sha256 HTTP/1.1", "Content-Length: 10000000000"))
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 5)  # no byte of the body was sent
    writer.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    # Chunked, without a length: cut at the limit, the upstream never gets more than the limit.
    async with httpx.AsyncClient(base_url=hostile.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:

        async def body() -> Any:
            for _ in range(100):
                yield b"x" * 65536

        r = await c.post("/r/up/sha256", content=body())
        assert r.status_code == 413


async def test_an_answer_before_the_whole_body_closes_the_connection(hostile: Relay) -> None:
    """A request answered before its body came (here a 401: no key) leaves a connection that can
    serve nothing more until that body has passed, and the relay times no body out there: a
    client announcing a gigabyte and sending a byte now and then held it for ever (uvicorn's
    keep-alive timer stops at the first byte). The relay closes it once the answer is out."""
    reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
    writer.write(b"POST /r/up/sink HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nx")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 401"), head
    writer.write(b"x")  # a byte of the body after the answer: the keep-alive timer is off now
    await writer.drain()
    rest = await asyncio.wait_for(reader.read(), 20)  # EOF: closed (only a hang guard)
    assert b"HTTP/1.1" not in rest
    writer.close()


async def test_slowloris_and_idle_connections_are_closed_and_others_are_served(hostile: Relay) -> None:
    mark = hostile.proc.mark()
    conns = []
    for i in range(40):
        # From an address of their own, so the relay's log lines about them can be counted.
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port, local_addr=("127.0.0.3", 0))
        if i % 2:
            writer.write(b"GET /r/up/small HTTP/1.1\r\n")  # half start a head, half send nothing
        conns.append((reader, writer))
    reads = [asyncio.create_task(r.read()) for r, _ in conns]  # done when the relay closes each

    async def dribble(writer: asyncio.StreamWriter) -> int:
        sent = 0
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            for _ in range(60):  # one header line a second: never a complete head
                writer.write(b"X-Slow: 1\r\n")
                await writer.drain()
                sent += 1
                await asyncio.sleep(1)
            raise AssertionError("a slowloris client was held for a minute")
        return sent

    dribblers = [asyncio.create_task(dribble(w)) for r, w in conns[1::2]]
    # Meanwhile everyone else is served: all five answers come while every slow connection is still
    # held (the relay closes those only after its head timeout, 10 s), an order, not a time limit.
    async with httpx.AsyncClient(base_url=hostile.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        for _ in range(5):
            assert (await c.get("/r/up/small")).status_code == 200
    assert not any(t.done() for t in reads), "a slow connection was closed before the others were served"
    closed = await asyncio.wait_for(asyncio.gather(*reads), 60)  # only a hang guard
    assert closed == [b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"] * 40
    # Each was closed by the head timeout (the relay says so once per connection), and a dribbling
    # client was cut well before its minute of header lines.
    said = "from 127.0.0.3: no complete request head in 10 s"
    until(lambda: "\n".join(hostile.proc.lines[mark:]).count(said) >= 40, 10, "the relay's 40 log lines")
    assert "\n".join(hostile.proc.lines[mark:]).count(said) == 40
    sent = await asyncio.gather(*dribblers)
    assert max(sent) < 60, sent
    for _, w in conns:
        w.close()


async def test_never_reading_clients_hold_bounded_memory_and_free_their_streams(hostile: Relay) -> None:
    pid = hostile.proc.popen.pid
    before = psutil.Process(pid).memory_info().rss
    sockets = []
    for _ in range(20):
        reader, writer = await asyncio.open_connection("127.0.0.1", hostile.port)
        writer.write(request("GET /r/up/bytes/200000000 HTTP/1.1"))
        await writer.drain()
        sockets.append((reader, writer))
    until(lambda: hostile.health()["requests_in_flight"] >= 20, what="20 downloads in flight")
    async with httpx.AsyncClient(base_url=hostile.url, headers={"Authorization": f"Bearer {API_KEY}"}) as c:
        assert (await c.get("/r/up/small")).status_code == 200
    grown = psutil.Process(pid).memory_info().rss - before
    assert grown < 80 << 20, f"relay grew by {grown >> 20} MiB for 20 clients that do not read 4 GB"
    for _, writer in sockets:
        writer.close()
    await asyncio.sleep(0)
    until(lambda: hostile.health()["requests_in_flight"] == 0, what="the streams to be freed")


# ---------------------------------------------------------------------------- secrets


async def test_no_error_body_or_log_line_carries_a_secret(hostile: Relay) -> None:
    bodies: list[str] = []
    async with httpx.AsyncClient(base_url=hostile.url) as c:
        for headers in (
            {"Authorization": f"Bearer {WRONG_KEYS[1]}"},
            {"X-Bridge-Key": WRONG_KEYS[2]},
            {"Authorization": f"Bearer {API_KEY}"},
        ):
            for path in ("/r/up/small", "/r/dead/x", "/r/nosuch/x", "/_relay/status", "/_relay/nothing"):
                r = await c.get(path, headers=headers)
                bodies.append(r.text + str(r.headers))
        r = await c.post("/_relay/login", data={"key": WRONG_KEYS[3]})
        bodies.append(r.text + str(r.headers))
    with sqlite3.connect(hostile.data_dir / "relay.sqlite3") as db:
        cookie_secret = db.execute("SELECT value FROM meta WHERE key = 'cookie_secret'").fetchone()[0]
    for text in [*bodies, hostile.proc.output]:
        for s in (API_KEY, NODE_TOKEN, cookie_secret, *WRONG_KEYS):
            assert s not in text


# ---------------------------------------------------------------------------- a malicious relay


class FakeRelay:
    """A relay that says WELCOME and then sends whatever a test gives it, on its own event loop (a
    thread), to a real in-process bridge. ``play`` returns once the bridge processed every message
    (it answers a ``ping`` sent after them) or dropped the connection."""

    def __init__(self, upstream: str) -> None:
        from bridge.config import BridgeConfig, Route
        from bridge.node.bridge import Bridge as NodeBridge

        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.ws: Any = None
        self.next_id = 1
        self.sessions = 0
        self.received = 0  # binary messages from the bridge
        self.connected = asyncio.Event()
        self.pong = asyncio.Event()
        self.closed = asyncio.Event()
        self.responses: list[p.Event] = []
        self.conn: p.Connection | None = None

        async def start() -> Any:
            return await websockets.serve(self._handler, "127.0.0.1", 0, max_size=None)

        self.server = self.call(start())
        port = self.server.sockets[0].getsockname()[1]
        config = BridgeConfig(
            relay=f"ws://127.0.0.1:{port}",
            routes=(Route("up", upstream),),
            node_token="fuzz",
            backoff_initial=0.01,
            backoff_max=0.05,
            connect_timeout=5,
            sample_interval=0,
        )
        self.bridge = NodeBridge(config)
        self.run = asyncio.run_coroutine_threadsafe(self.bridge.run(), self.loop)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _handler(self, ws: Any) -> None:
        conn = p.Connection(p.Role.RELAY)
        conn.receive(await ws.recv())  # HELLO
        conn.accept(f"fuzz-{self.sessions}", 60.0)
        for message in conn.data_to_send():
            await ws.send(message)
        self.ws, self.conn, self.next_id = ws, conn, 1
        self.sessions += 1
        self.closed.clear()
        self.connected.set()
        try:
            async for message in ws:
                if message == p.PONG:
                    self.pong.set()
                elif isinstance(message, bytes):
                    self.received += 1
                if isinstance(message, bytes) and self.conn is not None:
                    try:
                        self.responses += self.conn.receive(message)
                    except Exception:
                        self.conn = None  # the fuzz confused our own bookkeeping: stop parsing
        except websockets.ConnectionClosed:
            pass
        finally:
            self.connected.clear()
            self.closed.set()

    async def _play(self, messages: list[bytes | str]) -> None:
        await asyncio.wait_for(self.connected.wait(), 10)
        ws = self.ws
        self.pong.clear()
        self.conn = None
        try:
            for message in messages:
                await ws.send(message)
            await ws.send(p.PING)
        except websockets.ConnectionClosed:
            return
        done = {asyncio.ensure_future(self.pong.wait()), asyncio.ensure_future(self.closed.wait())}
        _, pending = await asyncio.wait(done, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()

    def play(self, build: Callable[[int], tuple[list[bytes | str], int]]) -> None:
        """``build(first free stream id)`` -> (messages, next free stream id)."""

        async def go() -> None:
            await asyncio.wait_for(self.connected.wait(), 10)
            messages, self.next_id = build(self.next_id)
            await self._play(messages)

        self.call(go())

    def disconnect(self) -> None:
        async def go() -> None:
            if self.ws is not None:
                await self.ws.close()
                await asyncio.wait_for(self.closed.wait(), 10)

        self.call(go())

    def get_small(self) -> int:
        """A well-formed request after the fuzz: the status the bridge answers."""

        async def go() -> int:
            await asyncio.wait_for(self.connected.wait(), 10)
            conn = self.conn
            assert conn is not None
            self.responses.clear()
            conn.open_stream(1, "GET", "up", "/small", [], end_stream=True)
            for message in conn.data_to_send():
                await self.ws.send(message)
            for _ in range(200):
                for event in self.responses:
                    if isinstance(event, p.ResponseReceived):
                        return event.status
                await asyncio.sleep(0.05)
            return 0

        status: int = self.call(go())
        return status

    def close(self) -> BaseException | None:
        """Stop the bridge, then this relay. Returns what the bridge's ``run()`` raised on its way
        out (a crash, or a stop that did not finish in 10 s), None for a clean stop: the test
        asserts it, so nothing the bridge raises is swallowed here."""
        error: BaseException | None = None
        try:
            self.bridge.stop()
            self.disconnect()
            self.run.result(10)
        except BaseException as exc:  # handed to the caller, which asserts there was none
            error = exc
        finally:
            self.server.close()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)
        return error


def _fuzz_strategies(canary_port: int) -> Any:
    from hypothesis import strategies as st

    c = f"127.0.0.1:{canary_port}"
    texts = st.text(max_size=12)
    targets = st.one_of(
        st.sampled_from(
            [
                "/small",
                "/headers",
                "/stream?n=3&interval=0.01",
                "/echo",
                "/bytes/300000",
                f"//{c}/x",
                f"/@{c}/",
                "/../../etc/passwd",
                "/%2e%2e/%2e%2e/",
                f"http://{c}/",
                f"@{c}",
                "",
                "/\r\nHost: evil",
                "/ws",
            ]
        ),
        texts,
    )
    header = st.one_of(
        st.sampled_from(
            [
                ("Host", c),
                ("Content-Length", "5"),
                ("Content-Length", "-1"),
                ("Transfer-Encoding", "chunked"),
                ("Connection", "close, host"),
                ("Upgrade", "websocket"),
                ("Origin", f"http://{c}"),
                ("X-A", "a\r\nX-Injected: 1"),
                ("Bad Name", "x"),
                ("", ""),
            ]
        ),
        st.tuples(st.text("abcdefxyz-_!#", min_size=1, max_size=8), texts),
        st.tuples(st.text("abcdefxyz-_!#", min_size=1, max_size=8), texts),
    )
    open_body = st.fixed_dictionaries(
        {
            "method": st.sampled_from(["GET", "POST", "CONNECT", "G E T", "", "TRACE"]),
            "route": st.sampled_from(["up", "nosuch", "", "../up"]),
            "target": targets,
            "headers": st.lists(header.map(list), max_size=4),
        },
        optional={"websocket": st.booleans(), "client": texts},
    ).map(lambda d: json.dumps(d).encode())
    payload = st.one_of(open_body, open_body, open_body, st.binary(max_size=40), st.just(b"{}"))
    kinds = st.sampled_from(
        ["open"] * 5 + ["data"] * 3 + ["reset", "window", "window", "goaway", "other", "raw"]
    )
    action = st.tuples(kinds, payload, st.integers(0, 3), st.integers(0, 255), st.binary(max_size=300))
    return st.lists(action, min_size=1, max_size=8)


def _build(
    actions: list[tuple[str, bytes, int, int, bytes]],
) -> Callable[[int], tuple[list[bytes | str], int]]:
    def build(next_id: int) -> tuple[list[bytes | str], int]:
        out: list[bytes | str] = []
        last = max(1, next_id - 1)
        for kind, payload, back, flags, data in actions:
            sid = max(1, last - back)
            if kind == "open":
                out.append(p.encode_frame(p.FrameType.OPEN, flags & 1, next_id, payload))
                last, next_id = next_id, next_id + 1
            elif kind == "data":
                out.append(p.encode_frame(p.FrameType.DATA, flags & 1, sid, data))
            elif kind == "reset":
                out.append(p.encode_frame(p.FrameType.RESET, 0, sid, data[:4].ljust(4, b"\0") + data[4:]))
            elif kind == "window":
                out.append(p.encode_frame(p.FrameType.WINDOW, 0, sid, data[:4].ljust(4, b"\1")))
            elif kind == "goaway":
                out.append(p.encode_frame(p.FrameType.GOAWAY, 0, 0, payload))
            elif kind == "other":
                out.append(p.encode_frame(flags, flags, sid if flags & 2 else 0, payload))
            else:
                out.append(data or b"\0")
        return out, next_id

    return build


def test_a_malicious_relay_cannot_crash_or_misdirect_a_bridge(upstream: str, canary: Canary) -> None:
    from hypothesis import HealthCheck, given, settings

    relay = FakeRelay(upstream)
    closed = False
    try:

        @settings(
            max_examples=120,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(_fuzz_strategies(canary.port))
        def fuzz(actions: list[tuple[str, bytes, int, int, bytes]]) -> None:
            relay.play(_build(actions))
            assert not relay.run.done(), f"the bridge stopped: {relay.run.exception()!r}"

        fuzz()
        # Whatever it was sent, the bridge is alive, drops every stream of a connection that goes
        # away, comes back, and serves a well-formed request.
        relay.disconnect()
        until(lambda: not relay.bridge._tasks, 15, "the bridge to drop every stream of the old link")
        assert not relay.run.done()
        assert relay.get_small() == 200
        print(f"\nfuzz: {relay.sessions} sessions, {relay.received} messages from the bridge")
        assert relay.sessions >= 1
        assert canary.hits == 0, "a malicious relay made the bridge connect to an address no route names"
        closed = True
        error = relay.close()
        assert error is None, f"the bridge did not stop cleanly after the fuzz: {error!r}"
    finally:
        if not closed:
            relay.close()


def test_a_bug_while_forwarding_resets_the_stream_and_the_bridge_serves_on(
    upstream: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception the forwarding does not expect (here a stand-in for a bug, raised by the real
    forwarding path for one target) must not leave the relay's client waiting for ever: the bridge
    resets that stream with INTERNAL_ERROR (the relay answers 502), logs the traceback, and keeps
    serving the others."""
    relay = FakeRelay(upstream)
    forward = relay.bridge.upstreams.forward_http

    async def buggy(method: str, route: str, target: str, *args: Any) -> None:
        if target == "/bug":
            raise RuntimeError("stand-in for a bug in the forwarding")
        await forward(method, route, target, *args)

    relay.bridge.upstreams.forward_http = buggy  # type: ignore[method-assign,assignment]

    async def request(target: str) -> p.Event | None:
        await asyncio.wait_for(relay.connected.wait(), 10)
        conn = relay.conn
        assert conn is not None
        relay.responses.clear()
        sid = relay.next_id
        relay.next_id += 2
        conn.open_stream(sid, "GET", "up", target, [], end_stream=True)
        for message in conn.data_to_send():
            await relay.ws.send(message)
        for _ in range(200):
            for event in relay.responses:
                if isinstance(event, p.ResponseReceived | p.StreamReset) and event.stream_id == sid:
                    return event
            await asyncio.sleep(0.05)
        return None

    closed = False
    try:
        with caplog.at_level("ERROR", logger="bridge"):
            event = relay.call(request("/bug"))
            assert isinstance(event, p.StreamReset), f"no RESET for the failed stream: {event!r}"
            assert event.code == p.ErrorCode.INTERNAL_ERROR
            assert p.STATUS_FOR_CODE.get(event.code, 502) == 502
            assert "stand-in for a bug" in caplog.text  # the traceback is in the log
            answer = relay.call(request("/small"))
            assert isinstance(answer, p.ResponseReceived) and answer.status == 200
        until(lambda: not relay.bridge._tasks, 10, "the failed stream's task to end")
        assert not relay.run.done()
        closed = True
        assert relay.close() is None
    finally:
        if not closed:
            relay.close()


# ---------------------------------------------------------------------------- a malicious bridge


class EvilBridge:
    """A bridge with the right node token that answers each OPEN with whatever a test says, on its
    own event loop (a thread), in front of a real relay process."""

    def __init__(self, relay: Relay) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.answer: list[bytes] = []  # frame payload templates for the next OPEN (see _reply)
        self.opened = 0
        self.ws: Any = None
        self.relay = relay
        self.task = asyncio.run_coroutine_threadsafe(self._run(), self.loop)
        until(lambda: relay.health()["node_connected"], 15, "the evil bridge to connect")

    async def _run(self) -> None:
        conn = p.Connection(p.Role.BRIDGE)
        async with websockets.connect(self.relay.ws_url + "/_relay/connect", max_size=None) as ws:
            self.ws = ws
            conn.send_hello(NODE_TOKEN, "evil", ["up"])
            for hello in conn.data_to_send():
                await ws.send(hello)
            async for message in ws:
                if isinstance(message, str):
                    if message == p.PING:
                        await ws.send(p.PONG)
                    continue
                for frame in p.iter_frames(message):
                    if frame.type == p.FrameType.OPEN:
                        self.opened += 1
                        sid = frame.stream_id.to_bytes(4, "big")
                        for out in self.answer:
                            await ws.send(out.replace(b"\xff\xff\xff\xff", sid))
                        # Then the stream ends, however it went: only a bridge that never ends a
                        # stream may keep its client waiting (as a slow engine may).
                        reset = p.encode_frame(p.FrameType.RESET, 0, frame.stream_id, b"\0\0\0\x08")
                        await ws.send(reset)

    def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(BaseException):
                asyncio.run_coroutine_threadsafe(self.ws.close(), self.loop).result(5)
        with contextlib.suppress(BaseException):
            self.task.result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def _evil_frame(type_: int, flags: int, payload: bytes) -> bytes:
    # The stream id is patched in when the OPEN arrives (placeholder 0x7fffffff -> see _run).
    return p.encode_frame(type_, flags, 0x7FFFFFFF, payload)[:5] + b"\xff\xff\xff\xff" + payload


def _evil_answers() -> Any:
    from hypothesis import strategies as st

    frame = _evil_frame

    header = st.one_of(
        st.sampled_from(
            [
                ["Content-Length", "5"],
                ["Content-Length", "999999"],
                ["Transfer-Encoding", "chunked"],
                ["Connection", "upgrade"],
                ["Upgrade", "websocket"],
                ["Set-Cookie", "bridge_session=forged; Path=/"],
                ["X-Euro", "\u20ac"],
                ["Bad(Name", "x"],
                ["X-Bridge-Node", "spoofed"],
                ["Location", "http://evil.example/"],
            ]
        ),
        st.tuples(st.text(max_size=6), st.text(max_size=6)).map(list),
    )
    response = st.fixed_dictionaries(
        {
            "status": st.one_of(
                st.sampled_from([100, 101, 103, 200, 204, 304, 404, 999]), st.integers(-5, 1200)
            )
        },
        optional={"headers": st.lists(header, max_size=4)},
    ).map(lambda d: json.dumps(d).encode())
    data = st.binary(max_size=2000)
    step = st.one_of(
        st.builds(lambda b, f: frame(p.FrameType.RESPONSE, f, b), response, st.integers(0, 1)),
        st.builds(lambda b, f: frame(p.FrameType.DATA, f, b), data, st.integers(0, 1)),
        st.builds(
            lambda c: frame(p.FrameType.RESET, 0, c.to_bytes(4, "big") + b"evil"), st.integers(0, 2**32 - 1)
        ),
        st.builds(lambda b: frame(p.FrameType.WINDOW, 0, b), st.binary(min_size=4, max_size=4)),
    )
    return st.lists(step, min_size=1, max_size=5)


def test_a_malicious_bridge_cannot_crash_the_relay_or_hang_its_clients(make_relay: MakeRelay) -> None:
    from hypothesis import HealthCheck, example, given, settings

    relay = make_relay("--grace", "2")
    evil = EvilBridge(relay)
    statuses: list[int | str] = []
    try:
        with httpx.Client(
            base_url=relay.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        ) as c:

            @settings(
                max_examples=300,
                deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
            )
            @given(_evil_answers())
            # A head that ends the stream yet names a length: the head still reaches the client
            # (the relay writes a head together with the body only when body bytes came with it).
            @example(
                [
                    _evil_frame(
                        p.FrameType.RESPONSE, 1, b'{"status": 200, "headers": [["Content-Length", "5"]]}'
                    )
                ]
            )
            @example(
                [
                    _evil_frame(
                        p.FrameType.RESPONSE, 0, b'{"status": 200, "headers": [["Content-Length", "5"]]}'
                    ),
                    _evil_frame(p.FrameType.DATA, 1, b"abc"),
                ]
            )
            def fuzz(answer: list[bytes]) -> None:
                evil.answer = answer
                expected = None  # the status the client must see, when the answer starts with a head
                if answer[0][3] == p.FrameType.RESPONSE:
                    head = json.loads(answer[0][9:])
                    malformed = any(  # what the protocol itself refuses (docs/protocol.md)
                        not k or any(ch in k for ch in " \t\r\n:") or any(ch in v for ch in "\r\n\0")
                        for k, v in head.get("headers", [])
                    )
                    expected = head["status"] if 200 <= head["status"] <= 599 and not malformed else 502
                started = time.monotonic()
                try:
                    with c.stream("GET", "/r/up/x") as r:
                        statuses.append(r.status_code)
                        assert expected is None or r.status_code == expected, (expected, r.status_code)
                        assert r.status_code != 101 and 200 <= r.status_code <= 599
                        assert r.headers.get("x-bridge-node") in (None, "evil")
                        assert "bridge_session=forged" not in r.headers.get("set-cookie", "")
                        with contextlib.suppress(httpx.TransportError):  # a cut body: the client knows
                            r.read()
                except httpx.TransportError as exc:
                    assert expected is None, f"no head for an answer that had one: {exc!r}"
                    statuses.append(type(exc).__name__)
                assert time.monotonic() - started < 10
                assert relay.proc.popen.poll() is None

            fuzz()
        # No stream left behind, the relay still answers.
        until(lambda: relay.health()["requests_in_flight"] == 0, 15, "every stream to be freed")
        print(f"\nevil bridge: {evil.opened} streams, outcomes {sorted(set(map(str, statuses)))}")
    finally:
        evil.close()


def test_response_heads_from_a_bridge_are_cleaned_not_mangled() -> None:
    from bridge.httprules import response_headers as _response_headers

    long_name = "Content-Security-Policy-Report-Only"  # real headers may be long: kept
    out = _response_headers(
        200,
        [
            (long_name, "default-src 'self'"),
            ("Bad(Name", "x"),
            ("X-Euro", "\u20ac"),
            ("X-Tab", "a\tb"),
            ("X-Bridge-Node", "spoofed"),
            ("Set-Cookie", "bridge_session=forged"),
            ("Set-Cookie", "webui=1"),
            ("Content-Length", "5"),
            ("content-length", "5"),
        ],
    )
    assert out == [
        (long_name, "default-src 'self'"),
        ("X-Tab", "a\tb"),
        ("Set-Cookie", "webui=1"),
        ("content-length", "5"),
    ]
    assert _response_headers(200, [("Content-Length", "5"), ("Content-Length", "6")]) == []
    assert _response_headers(304, [("Content-Length", "5"), ("ETag", '"x"')]) == [("ETag", '"x"')]
    assert _response_headers(101, []) is None and _response_headers(1000, []) is None
