"""The bridge's local endpoint (``bridge connect --listen``) and routes with several upstreams
(replicas): programs next to the bridge (Open WebUI talking to the engine) go through the same
forwarding, metering and balancing as requests through the relay. Real processes: stand-in Ollama
upstreams, a relay, the bridge, the real ``ollama`` client."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import ollama
import pytest

from bridge.config import parse_routes
from bridge.errors import ConfigError
from bridge.node.metering import LOG_NAME, read_log
from bridge.node.upstream import RoutePool

from .procs import (
    API_KEY,
    NODE_TOKEN,
    ROOT,
    Bridge,
    Proc,
    Relay,
    bridge_cmd,
    free_port,
    start_upstream,
    stop_all,
    until,
)
from .test_stats import _metric


def _counts(url: str) -> int:
    return int(httpx.get(url + "/_counts", timeout=10).json()["generations"])


def test_replicas_least_outstanding_and_dead_upstream_skipped(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    (a, url_a), (b, url_b) = start_upstream(), start_upstream()
    try:
        relay = make_relay()
        dead = f"http://127.0.0.1:{free_port()}"
        bridge = make_bridge(
            relay,
            {"ollama": f"{url_a},{url_b},{dead}"},
            "--listen",
            "127.0.0.1:0",
            "--metrics-dir",
            str(tmp_path / "m"),
            "--sample-interval",
            "0",
        )
        port = bridge.local_port()
        local = f"http://127.0.0.1:{port}"

        # Four at once: spread over the two live replicas, two each (the dead one is skipped).
        async def burst() -> list[int]:
            client = ollama.AsyncClient(host=f"{local}/r/ollama")
            replies = await asyncio.gather(
                *(client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}]) for _ in range(4))
            )
            return [r.eval_count or 0 for r in replies]

        assert asyncio.run(burst()) == [11] * 4
        assert (_counts(url_a), _counts(url_b)) == (2, 2)
        bridge.proc.wait_for(r"ollama upstream http://127\.0\.0\.1:\d+ unreachable", 10)

        # One long generation holds a replica: the next requests, one after the other, all go to
        # the other one (fewest outstanding), where round-robin alone would alternate.
        a0, b0 = _counts(url_a), _counts(url_b)
        started, done = threading.Event(), threading.Event()
        holder = threading.Thread(target=_hold_on_route, args=(local, started, done), daemon=True)
        holder.start()
        assert started.wait(30)
        busy, idle = (url_a, url_b) if _counts(url_a) == a0 + 1 else (url_b, url_a)
        idle0 = _counts(idle)
        with httpx.Client(base_url=local, timeout=60) as http:
            for _ in range(3):
                r = http.post("/r/ollama/api/chat", json={"model": "tiny", "stream": False, "messages": []})
                assert r.status_code == 200
        assert not done.is_set(), "the long generation ended too early to show anything"
        assert _counts(idle) == idle0 + 3
        assert _counts(busy) == (a0 if busy == url_a else b0) + 1
        holder.join(60)

        def chats_logged() -> list[dict[str, object]]:
            return [r for r in read_log(tmp_path / "m" / LOG_NAME) if r.get("path") == "/api/chat"]

        # The log line is written when the bridge has finished the request, which may be just
        # after the client has its last byte.
        until(lambda: len(chats_logged()) >= 8, 10, "8 chat lines in the bridge's log")
        chats = chats_logged()
        assert len(chats) == 8 and all(r["via"] == "local" and r["status"] == 200 for r in chats)
        assert all(r["upstream"] in (url_a, url_b) for r in chats)
    finally:
        stop_all([a, b])


def _hold_on_route(local: str, started: threading.Event, done: threading.Event) -> None:
    """A streaming generation through the replicated route that lasts about 5 s."""
    body = {"model": "tiny", "messages": [], "options": {"num_predict": 100}}
    with (
        httpx.Client(base_url=local, timeout=60) as http,
        http.stream("POST", "/r/ollama/api/chat", json=body) as r,
    ):
        for _ in r.iter_lines():
            started.set()
    done.set()


def test_local_endpoint_serves_default_route_and_is_metered_with_tunnel_traffic(
    upstream: str, make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    relay = make_relay()
    bridge = make_bridge(
        relay,
        {"webui": upstream, "ollama": upstream},
        "--listen",
        "127.0.0.1:0",
        "--default-route",
        "ollama",
        "--metrics-dir",
        str(tmp_path),
        "--sample-interval",
        "0",
    )
    local = f"http://127.0.0.1:{bridge.local_port()}"
    # Ollama's client pointed at the local root: the default route, Host rewritten (no 403).
    assert ollama.Client(host=local).list().models[0].model == "tiny:latest"
    r = httpx.get(local + "/r/nosuch/api/tags", timeout=10)
    assert r.status_code == 404 and "nosuch" in r.json()["error"]
    # Query strings and streamed request bodies pass as they are.
    r = httpx.post(local + "/r/webui/headers?x=1&y=%20", content=iter([b"ab", b"cd"]), timeout=10)
    assert r.json()["query"] == "x=1&y=%20" and r.json()["body_length"] == 4
    with relay.client() as c:
        assert c.post("/r/ollama/api/generate", json={"model": "tiny", "prompt": "hi"}).status_code == 200
    until(lambda: len(read_log(tmp_path / LOG_NAME)) >= 3, 20, "three records")
    vias = {(r["path"], r["via"]) for r in read_log(tmp_path / LOG_NAME)}
    assert {("/api/tags", "local"), ("/headers", "local"), ("/api/generate", "tunnel")} <= vias
    # The bridge's own Prometheus series, whichever way the requests came.
    text = httpx.get(local + "/_bridge/metrics", timeout=10).text
    assert (_metric(text, "bridge_request_ttft_seconds_count", route="ollama", model="tiny") or 0) >= 1
    assert (_metric(text, "bridge_node_requests_total", route="webui", status="200") or 0) >= 1


def test_local_endpoint_answers_as_the_relay_does(
    upstream: str, make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge]
) -> None:
    """The local endpoint follows the relay's HTTP rules: the same answer, byte for byte, to a
    route name that is empty, ``.``, ``..`` or percent-encoded, a target that cannot travel
    (``OPTIONS *``) and a route the bridge lacks. (On main it looked such names up as routes, in
    words of its own, and answered ``OPTIONS *`` with a 500.)"""
    relay = make_relay("--default-route", "ollama")
    bridge = make_bridge(relay, {"ollama": upstream}, "--listen", "127.0.0.1:0", "--sample-interval", "0")
    local = bridge.local_port()
    for target in ("/r/%6Fllama/api/tags", "/r/./api/tags", "/r/../api/tags", "/r//api/tags", "*", "/r/no/x"):
        method = "OPTIONS" if target == "*" else "GET"
        via_relay = _raw(relay.port, f"{method} {target}", f"Authorization: Bearer {API_KEY}")
        via_local = _raw(local, f"{method} {target}")
        assert via_local == via_relay and via_relay[0] in (400, 404), (target, via_local, via_relay)


def _raw(port: int, request_line: str, *headers: str) -> tuple[int, bytes]:
    """Status and body of one request written as it is (httpx would normalise the target)."""
    head = "\r\n".join([f"{request_line} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_local_endpoint_key_and_refusal_of_public_bind_without_one(
    upstream: str, make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge]
) -> None:
    refused = subprocess.run(
        bridge_cmd(
            "connect", "--node-token", NODE_TOKEN, "--route", f"ollama={upstream}", "--listen", "0.0.0.0:0"
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert refused.returncode == 2 and "refusing --listen 0.0.0.0:0 without --listen-key" in refused.stderr

    relay = make_relay()
    key = "local-key-for-tests-0123456789"
    bridge = make_bridge(
        relay, {"up": upstream}, "--listen", "127.0.0.1:0", "--listen-key", key, "--sample-interval", "0"
    )
    local = f"http://127.0.0.1:{bridge.local_port()}"
    assert httpx.get(local + "/headers", timeout=10).status_code == 401
    assert (
        httpx.get(local + "/headers", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code
        == 401
    )
    for auth in ({"Authorization": f"Bearer {key}"}, {"X-Bridge-Key": key}):
        r = httpx.get(local + "/headers", headers={**auth, "X-Other": "kept"}, timeout=10)
        assert r.status_code == 200
        sent = {k.lower(): v for k, v in r.json()["headers"]}
        assert "authorization" not in sent and "x-bridge-key" not in sent  # the key stays with the bridge
        assert sent["x-other"] == "kept"
    bridge.stop()
    assert key not in bridge.proc.output and API_KEY not in bridge.proc.output


def test_bridge_up_takes_replica_upstreams(tmp_path: Path) -> None:
    """``bridge up`` parses its routes as ``bridge connect`` does (one parser): a route with two
    upstreams is served by both (on main it refused the second URL as a route without a name)."""
    (a, url_a), (b, url_b) = start_upstream(), start_upstream()
    up = Proc(
        bridge_cmd("up", "--port", "0", "--data-dir", str(tmp_path), "--route", f"ollama={url_a},{url_b}"),
        "up",
    )
    try:
        url = up.wait_for(r"relay:\s+(http://\S+)/\s").group(1)
        assert up.wait_for(r"route:\s+\S+/r/ollama/\s+->\s+(.+)$").group(1) == f"{url_a}, {url_b}"
        key = up.wait_for(r"key:\s+(bk_\S+)").group(1)

        async def burst() -> None:
            client = ollama.AsyncClient(host=f"{url}/r/ollama", headers={"Authorization": f"Bearer {key}"})
            await asyncio.gather(*(client.chat(model="tiny", messages=[]) for _ in range(4)))

        asyncio.run(burst())
        assert (_counts(url_a), _counts(url_b)) == (2, 2)
    finally:
        stop_all([up, a, b])


def test_route_pool_order_and_replica_parsing() -> None:
    routes = parse_routes(
        ["ollama=http://127.0.0.1:1,http://127.0.0.1:2", "http://127.0.0.1:3 webui=http://h:8"]
    )
    assert [(r.name, r.url) for r in routes] == [
        ("ollama", "http://127.0.0.1:1"),
        ("ollama", "http://127.0.0.1:2"),
        ("ollama", "http://127.0.0.1:3"),
        ("webui", "http://h:8"),
    ]
    with pytest.raises(ConfigError, match="given twice"):
        parse_routes(["a=http://x:1,http://x:1"])
    pool = RoutePool("ollama", [r.url for r in routes[:3]])
    a, b, c = pool.upstreams
    picks = []
    for _ in range(3):  # all idle: in turn
        first = pool.candidates()[0]
        pool.picked(first)
        picks.append(first)
    assert picks == [a, b, c]
    a.outstanding, b.outstanding, c.outstanding = 2, 0, 1
    assert pool.candidates() == [b, c, a]  # fewest outstanding first
    b.failed_at = time.monotonic()
    assert pool.candidates() == [c, a, b]  # a replica that just refused a connection goes last
