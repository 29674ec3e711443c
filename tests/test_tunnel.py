"""HTTP through a real relay and a real bridge, with the real clients users use (httpx, ollama,
openai), against a real upstream server on loopback. These tests share one relay and bridge."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from .procs import API_KEY, Relay, release, until
from .upstreams import MODEL, REPLY, TOKEN_DELAY


def _headers_seen(relay: Relay, **kw: Any) -> dict[str, Any]:
    with relay.client() as c:
        r = c.get("/r/up/headers", **kw)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def _spread(arrivals: list[float]) -> float:
    return arrivals[-1] - arrivals[0]


# ------------------------------------------------------------------------------------ addressing


def test_route_prefix_is_stripped_and_query_kept(stack: Relay) -> None:
    seen = _headers_seen(stack, params={"a": "1", "b": "x y"})
    assert seen["path"] == "/headers"
    assert seen["query"] == "a=1&b=x+y"


def test_default_route_is_served_at_the_root(stack: Relay) -> None:
    with stack.client() as c:
        r = c.get("/")
    assert (r.status_code, r.text) == (200, "Ollama is running")


def test_unknown_route_is_404_and_unreachable_upstream_502(stack: Relay) -> None:
    with stack.client() as c:
        assert c.get("/r/nope/x").status_code == 404
        r = c.get("/r/dead/x")
    assert r.status_code == 502
    assert "unreachable" in r.text


def test_upstream_status_and_headers_pass_through(stack: Relay) -> None:
    with stack.client() as c:
        r = c.get("/r/up/status/418")
    assert r.status_code == 418
    assert r.text == "status 418"
    assert r.headers["content-type"] == "text/plain"


def test_host_and_origin_are_rewritten_for_the_upstream(stack: Relay, upstream: str) -> None:
    seen = _headers_seen(stack, headers={"Origin": "https://evil.example", "X-Custom": "kept"})
    headers = {k.lower(): v for k, v in seen["headers"]}
    assert headers["host"] == upstream.removeprefix("http://")
    assert headers["origin"] == upstream
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    # Ollama answers 403 to a foreign Host or Origin: through the relay, a browser's Origin passes.
    with stack.client() as c:
        r = c.get("/r/ollama/api/tags", headers={"Origin": "https://my-relay.example"})
    assert r.status_code == 200, r.text
    # ...while the same request sent straight to the upstream is refused, so the rewrite matters.
    assert (
        httpx.get(upstream + "/api/tags", headers={"Origin": "https://my-relay.example"}).status_code == 403
    )


def test_relay_strips_its_own_client_key_and_hop_by_hop_headers(stack: Relay) -> None:
    seen = _headers_seen(stack, headers={"Connection": "keep-alive, X-Drop", "X-Drop": "1", "TE": "trailers"})
    names = {k.lower() for k, _ in seen["headers"]}
    assert "authorization" not in names
    assert not names & {"x-drop", "te", "connection", "x-bridge-key"}
    assert API_KEY not in json.dumps(seen)
    with httpx.Client(base_url=stack.url) as c:
        r = c.get("/r/up/headers", headers={"X-Bridge-Key": API_KEY})
    assert r.status_code == 200
    assert API_KEY not in r.text


# ------------------------------------------------------------------------------------ authentication


def test_no_key_is_401_with_www_authenticate(stack: Relay) -> None:
    r = httpx.get(stack.url + "/r/up/small")
    assert r.status_code == 401
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert (
        httpx.get(stack.url + "/r/up/small", headers={"Authorization": "Bearer bk_nope_nope"}).status_code
        == 401
    )
    assert httpx.get(stack.url + "/_relay/status").status_code == 401


def test_browser_without_cookie_is_sent_to_the_login_page(stack: Relay) -> None:
    r = httpx.get(stack.url + "/c/abc?x=1", headers={"Accept": "text/html,*/*"})
    assert r.status_code == 303
    assert r.headers["location"] == "/_relay/login?next=%2Fc%2Fabc%3Fx%3D1"
    page = httpx.get(stack.url + "/_relay/login")
    assert page.status_code == 200 and "<form" in page.text


def test_login_cookie_authenticates_and_app_authorization_passes_through(stack: Relay) -> None:
    with httpx.Client(base_url=stack.url) as browser:
        bad = browser.post("/_relay/login", data={"key": "wrong", "next": "/"})
        assert bad.status_code == 401
        r = browser.post("/_relay/login", data={"key": API_KEY, "next": "/r/up/small"})
        assert r.status_code == 303
        assert r.headers["location"] == "/r/up/small"
        cookie = r.cookies.get("bridge_session")
        assert cookie and API_KEY not in cookie
        browser.cookies.set("theme", "dark")
        seen = browser.get(
            "/headers", headers={"Authorization": "Bearer open-webui-jwt"}
        ).json()  # Open WebUI's own token, to the default route
        headers = dict((k.lower(), v) for k, v in seen["headers"])
        assert headers["authorization"] == "Bearer open-webui-jwt"
        assert headers["cookie"] == "theme=dark"  # the relay's cookie is removed, the app's kept
        # A route under /r/ gets no cookie at all (docs/security.md §5, unless --cookie-route).
        seen = browser.get("/r/up/headers").json()
        assert "cookie" not in dict((k.lower(), v) for k, v in seen["headers"])
        assert browser.get("/_relay/logout").status_code in (200, 303)
        assert browser.get("/r/up/small").status_code == 401


def test_health_needs_no_key_and_shows_no_secrets(stack: Relay) -> None:
    health = stack.health()
    assert health["node_connected"] is True
    assert health["connected_since"] and health["last_connected_at"]
    assert isinstance(health["requests_in_flight"], int)
    assert "token" not in json.dumps(health).lower()
    with stack.client() as c:
        status = c.get("/_relay/status").json()
        metrics = c.get("/_relay/metrics")
    assert [sorted(n["routes"]) for n in status["nodes_detail"]] == [["dead", "ollama", "up"]]
    assert metrics.headers["content-type"].startswith("text/plain")
    assert "bridge_relay_requests_in_flight" in metrics.text


# ------------------------------------------------------------------------------------ real clients


def test_ollama_client_streams_chat_token_by_token(stack: Relay) -> None:
    client = ollama.Client(host=stack.url + "/r/ollama", headers={"Authorization": f"Bearer {API_KEY}"})
    assert [m.model for m in client.list().models] == [MODEL]
    arrivals: list[float] = []
    text = ""
    for part in client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True):
        arrivals.append(time.monotonic())
        text += part.message.content or ""
    assert text == REPLY
    # Tokens leave the upstream TOKEN_DELAY apart; had anything buffered, they would arrive together.
    assert _spread(arrivals) >= 0.6 * TOKEN_DELAY * (len(REPLY.split()) - 1)


def test_ollama_host_environment_variable_works_unchanged(
    stack: Relay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", stack.url + "/r/ollama")
    client = ollama.Client(headers={"Authorization": f"Bearer {API_KEY}"})
    reply = client.generate(model=MODEL, prompt="hi", stream=False)
    assert reply.response == REPLY
    assert reply.eval_count == len(REPLY.split())


async def test_ollama_async_client_many_at_once(stack: Relay) -> None:
    client = ollama.AsyncClient(host=stack.url + "/r/ollama", headers={"Authorization": f"Bearer {API_KEY}"})

    async def one() -> str:
        text = ""
        async for part in await client.generate(model=MODEL, prompt="hi", stream=True):
            text += part.response or ""
        return text

    assert await asyncio.gather(*(one() for _ in range(32))) == [REPLY] * 32


def test_openai_sdk_streams_through_the_relay(stack: Relay) -> None:
    client = openai.OpenAI(base_url=stack.url + "/r/ollama/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list()] == [MODEL]
    arrivals: list[float] = []
    text = ""
    for chunk in client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            text += chunk.choices[0].delta.content
    assert text == REPLY
    assert _spread(arrivals) >= 0.6 * TOKEN_DELAY * (len(REPLY.split()) - 1)
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert full.choices[0].message.content == REPLY
    assert full.usage is not None and full.usage.completion_tokens == len(REPLY.split())


def test_openai_sdk_with_a_wrong_key_gets_authentication_error(stack: Relay) -> None:
    client = openai.OpenAI(base_url=stack.url + "/r/ollama/v1", api_key="bk_wrong_key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


# ------------------------------------------------------------------------------------ streaming


def test_ndjson_lines_arrive_as_the_upstream_writes_them(stack: Relay, upstream: str) -> None:
    # The upstream writes each next line only once the client has read the last one through the
    # relay (tests/procs.py release): a line held back anywhere on the way is a read that times out.
    seen, gate = [], f"ndjson-{uuid.uuid4().hex}"
    with (
        stack.client(timeout=httpx.Timeout(30, read=20)) as c,
        c.stream("GET", "/r/up/stream", params={"n": 8, "gate": gate}) as r,
    ):
        assert r.headers["content-type"] == "application/x-ndjson"
        for line in r.iter_lines():
            seen.append(json.loads(line)["i"])
            release(upstream, gate)
    assert seen == list(range(8))


def test_sse_events_arrive_one_by_one(stack: Relay, upstream: str) -> None:
    seen, gate = [], f"sse-{uuid.uuid4().hex}"
    with (
        stack.client(timeout=httpx.Timeout(30, read=20)) as c,
        c.stream("GET", "/r/up/sse", params={"n": 6, "gate": gate}) as r,
    ):
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen.append(json.loads(line[6:])["i"])
                release(upstream, gate)
    assert seen == list(range(6))


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _pattern(n: int) -> Iterator[bytes]:
    block = os.urandom(1 << 20)
    for i in range(n):
        yield block[i % 7 :] + block[: i % 7]


def test_chunked_upload_streams_through_intact_in_bounded_memory(stack: Relay) -> None:
    n = 64  # MiB, sent chunked: neither relay nor bridge holds the whole body
    expected = hashlib.sha256()
    pids = [stack.proc.popen.pid, stack.bridge_pid]
    before = [_rss(pid) for pid in pids]

    def body() -> Iterator[bytes]:
        for chunk in _pattern(n):
            expected.update(chunk)
            yield chunk

    with stack.client() as c:
        r = c.post("/r/up/sha256", content=body())
    assert r.status_code == 200, r.text
    assert r.json() == {"sha256": expected.hexdigest(), "length": n << 20}
    grown = [_rss(pid) - b for pid, b in zip(pids, before, strict=True)]
    assert max(grown) < 40 << 20, f"relay/bridge grew by {grown} bytes for a {n} MiB upload"


async def test_echo_streams_the_response_back(stack: Relay) -> None:
    async def body() -> Any:
        for i in range(100):
            yield b"%d " % i

    async with stack.aclient() as c:
        r = await c.post("/r/up/echo", content=body(), headers={"Content-Type": "text/plain"})
    assert r.headers["content-type"] == "text/plain"
    assert r.content == b"".join(b"%d " % i for i in range(100))


def test_large_download_is_complete_and_exact(stack: Relay) -> None:
    n = 40 * 1000 * 1000 + 123
    block = bytes(range(256)) * 256
    digest = hashlib.sha256()
    with stack.client() as c, c.stream("GET", f"/r/up/bytes/{n}") as r:
        assert r.headers["content-length"] == str(n)
        for chunk in r.iter_raw():
            digest.update(chunk)
    expected = hashlib.sha256((block * (n // len(block) + 1))[:n]).hexdigest()
    assert digest.hexdigest() == expected


async def test_a_client_that_stops_reading_stalls_no_one_and_buffers_little(stack: Relay) -> None:
    pid = stack.proc.popen.pid
    before = _rss(pid)
    async with stack.aclient() as slow, stack.aclient() as fast:
        req = slow.build_request("GET", "/r/up/bytes/300000000")
        stalled = await slow.send(req, stream=True)
        assert stalled.status_code == 200
        # Meanwhile other requests go through at once.
        results = await asyncio.gather(*(fast.get("/r/up/small") for _ in range(50)))
        assert all(r.status_code == 200 for r in results)
        async with fast.stream("GET", "/r/up/bytes/5000000") as r:
            assert len(await r.aread()) == 5_000_000
        # The relay holds at most a window's worth of the stalled body, not 300 MB.
        grown = _rss(pid) - before
        assert grown < 60 << 20, f"relay grew by {grown >> 20} MiB while a client did not read"
        await stalled.aclose()


async def test_many_concurrent_streams_each_complete(stack: Relay) -> None:
    async with stack.aclient(limits=httpx.Limits(max_connections=300)) as c:

        async def one(i: int) -> int:
            async with c.stream("GET", "/r/up/stream", params={"n": 5, "interval": 0.02}) as r:
                return len([line async for line in r.aiter_lines() if line])

        counts = await asyncio.gather(*(one(i) for i in range(250)))
    assert counts == [5] * 250


def _hangs_left(upstream: str) -> int:
    return int(httpx.get(upstream + "/_counts", timeout=10).json()["hangs_left"])


async def test_client_that_goes_away_frees_its_stream(stack: Relay, upstream: str) -> None:
    """Mid-answer, while the upstream sends nothing: the relay frees the stream, and the bridge
    stops the upstream's work at once (it closes the upstream connection), not at its next write."""
    left = _hangs_left(upstream)
    async with stack.aclient() as c:
        for _ in range(3):
            async with c.stream("GET", "/r/up/hang", params={"head": "1"}) as r:
                assert r.status_code == 200
                assert await r.aiter_raw().__anext__() == b"partial"
    until(lambda: stack.health()["requests_in_flight"] == 0, what="the relay to free the streams")
    until(lambda: _hangs_left(upstream) == left + 3, what="the bridge to leave the upstream's answers")


async def test_client_that_goes_away_before_the_head_frees_its_stream(stack: Relay, upstream: str) -> None:
    """As a client that leaves a prefill or a ``stream: false`` chat: nothing came back yet, only
    the relay's server can tell it that the client left; the upstream's work stops too."""
    auth = b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
    left = _hangs_left(upstream)
    for _ in range(3):
        _, writer = await asyncio.open_connection("127.0.0.1", stack.port)
        writer.write(b"GET /r/up/hang HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
        await writer.drain()
        await asyncio.to_thread(
            until, lambda: stack.health()["requests_in_flight"] == 1, what="the request in flight"
        )
        writer.close()
        await writer.wait_closed()
        await asyncio.to_thread(
            until, lambda: stack.health()["requests_in_flight"] == 0, what="the relay to free the stream"
        )
    await asyncio.to_thread(
        until, lambda: _hangs_left(upstream) == left + 3, what="the bridge to leave the upstream's requests"
    )


async def _raw(relay: Relay, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    writer.write(request)
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    return head


async def test_requests_the_bridge_cannot_carry_are_answered_by_the_relay(stack: Relay) -> None:
    auth = b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
    head = await _raw(stack, b"OPTIONS * HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    big = b"X-Big: " + b"a" * 70_000 + b"\r\n"
    head = await _raw(stack, b"GET /r/up/small HTTP/1.1\r\nHost: x\r\n" + auth + big + b"\r\n")
    assert head.split(b" ")[1] in (b"431", b"400")  # the server's own header limit may answer first
    # The tunnel is still fine for everyone else.
    async with stack.aclient() as c:
        assert (await c.get("/r/up/small")).status_code == 200
