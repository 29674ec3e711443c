"""Several notebooks behind one relay (issue 8): load balancing, drain and handover, retry once,
sticky browsers, idempotent retries and the job API. Real relay, real bridges, real upstreams."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from .procs import API_KEY, Bridge, Proc, Relay, start_upstream, until

KEY2 = "bk_test0002_another-client-key-for-tests"
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def engine() -> Iterator[tuple[Proc, str]]:
    """An upstream of this test's own, so its generation count is this test's alone."""
    proc, url = start_upstream(token_delay=0.05)
    yield proc, url
    proc.stop()


@pytest.fixture
def blackhole() -> Iterator[str]:
    """An address that accepts connections and never answers: requests sent there hang before
    any response, as on an engine that died without closing its socket."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


def generations(url: str) -> int:
    count: int = httpx.get(url + "/_counts", timeout=10).json()["generations"]
    return count


def node_of(response: httpx.Response) -> str:
    return response.headers["x-bridge-node"]


async def test_least_outstanding_spreads_concurrent_streams(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str
) -> None:
    relay = make_relay()
    make_bridge(relay, {"up": upstream}, "--node-name", "nb-a")
    make_bridge(relay, {"up": upstream}, "--node-name", "nb-b")
    async with relay.aclient() as client:

        async def one() -> str:
            r = await client.get("/r/up/stream", params={"n": 10, "interval": 0.05})
            assert r.status_code == 200 and r.text.count("\n") == 10
            return node_of(r)

        nodes = Counter(await asyncio.gather(*(one() for _ in range(8))))
    assert set(nodes) == {"nb-a", "nb-b"}
    assert abs(nodes["nb-a"] - nodes["nb-b"]) <= 2, nodes


async def test_handover_under_load_fails_nothing(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str
) -> None:
    """A new session's node joins, the old one drains (SIGTERM): every request succeeds whole and
    new work moves to the new node."""
    relay = make_relay()
    old = make_bridge(relay, {"up": upstream}, "--node-name", "old")
    # (status, node, lines, whether the request was sent after the old node's process had exited)
    results: list[tuple[int, str, int, bool]] = []
    stop = asyncio.Event()
    exited = False

    async with relay.aclient() as client:

        async def worker() -> None:
            while not stop.is_set():
                after = exited  # a request sent before may still be answered by the old node
                r = await client.get("/r/up/stream", params={"n": 5, "interval": 0.02})
                results.append((r.status_code, r.headers.get("x-bridge-node", ""), r.text.count("\n"), after))

        workers = [asyncio.create_task(worker()) for _ in range(4)]
        await asyncio.to_thread(until, lambda: len(results) >= 10, 30, "load on the old node")
        await asyncio.to_thread(make_bridge, relay, {"up": upstream}, "--node-name", "new")
        old.proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(old.proc.wait, 30) == 0
        exited = True
        await asyncio.to_thread(until, lambda: sum(r[3] for r in results) >= 10, 30, "load on the new node")
        stop.set()
        await asyncio.gather(*workers)

    assert all(status == 200 and lines == 5 for status, _, lines, _ in results), results
    assert {node for _, node, _, after in results if after} == {"new"}


async def test_request_is_retried_once_on_another_node(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str, blackhole: str
) -> None:
    relay = make_relay()
    lost = make_bridge(relay, {"up": blackhole}, "--node-name", "lost")
    async with relay.aclient() as client:
        pending = asyncio.create_task(client.post("/r/up/echo", content=b"payload-1"))
        await asyncio.to_thread(
            until, lambda: relay.health()["requests_in_flight"] == 1, 15, "request at the node"
        )
        make_bridge(relay, {"up": upstream}, "--node-name", "good")
        lost.proc.signal(signal.SIGKILL)
        r = await pending
    assert r.status_code == 200 and r.content == b"payload-1"
    assert node_of(r) == "good"
    with relay.client() as c:
        assert "bridge_relay_retries_total 1.0" in c.get("/_relay/metrics").text


async def test_retry_happens_at_most_once(
    make_relay: Callable[..., Relay],
    make_bridge: Callable[..., Bridge],
    engine: tuple[Proc, str],
    blackhole: str,
) -> None:
    relay = make_relay()
    first = make_bridge(relay, {"ollama": blackhole}, "--node-name", "first")
    async with relay.aclient() as client:
        pending = asyncio.create_task(client.post("/r/ollama/api/chat", json=CHAT))
        await asyncio.to_thread(
            until, lambda: relay.health()["requests_in_flight"] == 1, 15, "request at node 1"
        )
        second = make_bridge(relay, {"ollama": blackhole}, "--node-name", "second")
        first.proc.signal(signal.SIGKILL)
        with relay.client() as c:
            await asyncio.to_thread(
                until,
                lambda: "bridge_relay_retries_total 1.0" in c.get("/_relay/metrics").text,
                15,
                "the retry",
            )
        make_bridge(relay, {"ollama": engine[1]}, "--node-name", "third")
        second.proc.signal(signal.SIGKILL)
        r = await pending
    assert r.status_code in (502, 503), r.text
    assert generations(engine[1]) == 0  # not sent a third time


async def test_browser_sticks_to_its_node(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str
) -> None:
    relay = make_relay("--default-route", "up")
    make_bridge(relay, {"up": upstream}, "--node-name", "nb-a")
    make_bridge(relay, {"up": upstream}, "--node-name", "nb-b")
    async with httpx.AsyncClient(base_url=relay.url, timeout=30) as browser:
        login = await browser.post("/_relay/login", data={"key": API_KEY, "next": "/"})
        assert login.status_code == 303
        first = await browser.get("/small")
        home = node_of(first)
        assert browser.cookies.get("bridge_node") == home
        seen = {node_of(await browser.get("/small")) for _ in range(10)}
        assert seen == {home}
        headers = (await browser.get("/headers")).json()
        assert "bridge_node" not in json.dumps(headers)  # the relay's cookies stay at the relay


async def test_idempotent_retry_joins_the_generation_in_flight(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], engine: tuple[Proc, str]
) -> None:
    relay = make_relay("--api-keys", f"{API_KEY},{KEY2}")
    make_bridge(relay, {"ollama": engine[1]})
    headers = {"Idempotency-Key": "req-42"}
    async with relay.aclient() as client:
        # A client with a short timeout gives up after the first token...
        async with client.stream("POST", "/r/ollama/api/chat", json=CHAT, headers=headers) as r:
            assert r.headers["x-bridge-idempotent"] == "new"
            async for _line in r.aiter_lines():
                break
        # ...and retries: it joins the same generation and gets the whole answer from the start.
        again = await client.post("/r/ollama/api/chat", json=CHAT, headers=headers)
        assert again.headers["x-bridge-idempotent"] == "joined"
        lines = [json.loads(line) for line in again.text.splitlines()]
        text = "".join(line["message"]["content"] for line in lines)
        assert text == "Hello from the stand-in engine , streamed token by token ." and lines[-1]["done"]
        replay = await client.post("/r/ollama/api/chat", json=CHAT, headers=headers)
        assert replay.headers["x-bridge-idempotent"] == "replayed" and replay.content == again.content
        assert generations(engine[1]) == 1
        # Never shared between keys.
        other = await client.post(
            "/r/ollama/api/chat", json=CHAT, headers={**headers, "Authorization": f"Bearer {KEY2}"}
        )
        assert other.headers["x-bridge-idempotent"] == "new"
        assert generations(engine[1]) == 2
        # A deterministic body (temperature 0) is recognised without a header.
        cold = {**CHAT, "options": {"temperature": 0}}
        a, b = await asyncio.gather(
            client.post("/r/ollama/api/chat", json=cold), client.post("/r/ollama/api/chat", json=cold)
        )
        assert a.content == b.content and a.status_code == b.status_code == 200
        assert generations(engine[1]) == 3
        # An ordinary request is never shared.
        await client.post("/r/ollama/api/chat", json=CHAT)
        await client.post("/r/ollama/api/chat", json=CHAT)
        assert generations(engine[1]) == 5


def test_job_api_round_trip_across_a_relay_restart(
    make_relay: Callable[..., Relay],
    make_bridge: Callable[..., Bridge],
    engine: tuple[Proc, str],
    tmp_path: Path,
) -> None:
    relay = make_relay("--api-keys", f"{API_KEY},{KEY2}")
    make_bridge(relay, {"ollama": engine[1]})
    with relay.client() as client:
        submit = client.post(
            "/_relay/jobs", json={"route": "ollama", "path": "/api/chat", "body": {**CHAT, "stream": False}}
        )
        assert submit.status_code == 202, submit.text
        job = submit.json()
        assert job["state"] == "running" and job["url"] == f"/_relay/jobs/{job['id']}"
        done = client.get(job["url"], params={"wait": 30}).json()
        assert done["state"] == "done", done
        assert done["response"]["status"] == 200
        answer = json.loads(done["response"]["body"])
        assert answer["message"]["content"].startswith("Hello from the stand-in engine")
        assert client.get(job["url"], headers={"Authorization": f"Bearer {KEY2}"}).status_code == 404
        assert [j["id"] for j in client.get("/_relay/jobs").json()["jobs"]] == [job["id"]]
        bad = client.post("/_relay/jobs", json={"route": "ollama", "path": "no-slash"})
        assert bad.status_code == 400
    relay.restart()
    with relay.client() as client:
        kept = client.get(job["url"]).json()
        assert kept["state"] == "done" and kept["response"]["body"] == done["response"]["body"]
        assert client.delete(job["url"]).status_code == 200
        assert client.get(job["url"]).status_code == 404
    assert httpx.post(relay.url + "/_relay/jobs", json={}).status_code == 401
    assert generations(engine[1]) == 1


async def _hand_bridge(relay: Relay, node: str, models: list[str], ready: asyncio.Event) -> None:
    """A minimal bridge on the sans-I/O core that answers every stream with its own name: enough to
    see where the relay sends a request (the real bridge advertises models the same way, in HELLO)."""
    from websockets.asyncio.client import connect

    from bridge import wire as p

    from .procs import NODE_TOKEN

    conn = p.Connection(p.Role.BRIDGE)
    async with connect(relay.ws_url + "/_relay/connect") as ws:
        conn.send_hello(NODE_TOKEN, node, ["ollama"], models=models)
        for message in conn.data_to_send():
            await ws.send(message)
        async for raw in ws:
            if not isinstance(raw, bytes):
                continue
            for event in conn.receive(raw):
                if isinstance(event, p.WelcomeReceived):
                    ready.set()
                elif isinstance(event, p.StreamOpened):
                    conn.send_response(event.stream_id, 200, [("content-type", "text/plain")])
                    conn.send_data(event.stream_id, node.encode(), end_stream=True)
            for out in conn.data_to_send():
                await ws.send(out)


async def test_requests_go_to_a_node_that_serves_the_model(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay()
    events = [asyncio.Event() for _ in range(3)]
    nodes = [
        asyncio.create_task(_hand_bridge(relay, "small", ["tiny:latest"], events[0])),
        asyncio.create_task(_hand_bridge(relay, "large", ["qwen3:8b"], events[1])),
        asyncio.create_task(_hand_bridge(relay, "any", [], events[2])),
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 15)
        async with relay.aclient() as client:

            async def ask(model: str) -> str:
                r = await client.post("/r/ollama/api/chat", json={"model": model, "messages": []})
                return r.text

            assert {await ask("qwen3:8b") for _ in range(6)} == {"large"}
            assert {await ask("tiny") for _ in range(6)} == {"small"}  # tiny == tiny:latest
            assert {await ask("mistral") for _ in range(6)} == {"any"}  # nobody lists it: the open node
    finally:
        for task in nodes:
            task.cancel()
        await asyncio.gather(*nodes, return_exceptions=True)


async def test_real_bridges_advertise_their_engines_models(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge]
) -> None:
    """Each bridge asks its engine which models it serves (Ollama's /api/tags) and tells the relay,
    which then sends a request naming a model only to a node that has it."""
    relay = make_relay()
    engines = [start_upstream(model="alpha:latest"), start_upstream(model="beta:7b")]
    try:
        for name, (_, url) in zip(("nb-alpha", "nb-beta"), engines, strict=True):
            make_bridge(relay, {"ollama": url}, "--node-name", name)

        def models() -> dict[str, list[str]]:
            nodes = relay.client().get("/_relay/status").json()["nodes_detail"]
            return {n["node"]: n["models"] for n in nodes}

        until(lambda: models() == {"nb-alpha": ["alpha:latest"], "nb-beta": ["beta:7b"]}, 20, "models listed")
        async with relay.aclient() as client:

            async def ask(model: str) -> str:
                r = await client.post("/r/ollama/api/chat", json={**CHAT, "model": model, "stream": False})
                assert r.status_code == 200, r.text
                return node_of(r)

            assert {await ask("alpha") for _ in range(4)} == {"nb-alpha"}  # alpha == alpha:latest
            assert {await ask("beta:7b") for _ in range(4)} == {"nb-beta"}
    finally:
        for proc, _ in engines:
            proc.stop()
