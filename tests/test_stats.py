"""STATS frames: a bridge's measurements reach the relay's Prometheus endpoint, status JSON and
status page. The bridge side here is the sans-I/O core driven by hand over a real WebSocket to a
real relay process, so the test controls exactly what is sent (the real bridge's sender is tested
with the metrics)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError

from bridge import wire as p

from .procs import API_KEY, NODE_TOKEN, Relay, until

REQUEST = {
    "kind": "request",
    "route": "ollama",
    "model": "qwen3:8b",
    "status": 200,
    "ttft_s": 0.25,
    "total_s": 3.0,
    "queue_s": 0.001,
    "tokens_per_s": 40.0,
    "prompt_tokens": 30,
    "completion_tokens": 120,
}
SAMPLE = {
    "kind": "sample",
    "gpus": [
        {"index": 0, "name": "Tesla T4", "memory_used_bytes": 6 * 2**30, "memory_total_bytes": 15 * 2**30},
        {"index": 1, "name": "Tesla T4", "memory_used_bytes": 5 * 2**30, "memory_total_bytes": 15 * 2**30},
    ],
    "cpu_percent": 50.0,
    "ram_used_bytes": 2**30,
}


async def _handshake(ws: ClientConnection, conn: p.Connection, node: str) -> None:
    conn.send_hello(NODE_TOKEN, node, ["ollama"])
    for message in conn.data_to_send():
        await ws.send(message)
    while not conn.established:
        reply = await ws.recv()
        if isinstance(reply, bytes):
            conn.receive(reply)


@pytest.fixture
async def hand_bridge(
    make_relay: Callable[..., Relay],
) -> AsyncIterator[tuple[Relay, ClientConnection, p.Connection]]:
    relay = make_relay()
    async with connect(relay.ws_url + "/_relay/connect") as ws:
        conn = p.Connection(p.Role.BRIDGE)
        await _handshake(ws, conn, "nb-1")
        yield relay, ws, conn


async def _send(ws: ClientConnection, conn: p.Connection) -> None:
    for message in conn.data_to_send():
        await ws.send(message)


def _metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_request_and_sample_reach_metrics_status_and_page(
    hand_bridge: tuple[Relay, ClientConnection, p.Connection],
) -> None:
    relay, ws, conn = hand_bridge
    conn.send_stats(REQUEST)
    conn.send_stats({**REQUEST, "ttft_s": 0.75, "completion_tokens": 80})
    conn.send_stats(SAMPLE)
    conn.send_stats({"kind": "node", "models": ["qwen3:8b"], "gpu_mode": "replicas"})
    await _send(ws, conn)

    with relay.client() as client:
        until(
            lambda: _metric(client.get("/_relay/metrics").text, "bridge_completion_tokens_total") == 200,
            what="the relay published the STATS",
        )
        text = client.get("/_relay/metrics").text
        labels = {"node": "nb-1", "route": "ollama", "model": "qwen3:8b"}
        assert _metric(text, "bridge_request_ttft_seconds_count", **labels) == 2
        assert _metric(text, "bridge_request_ttft_seconds_sum", **labels) == pytest.approx(1.0)
        assert _metric(text, "bridge_prompt_tokens_total", **labels) == 60
        assert _metric(text, "bridge_gpu_memory_used_bytes", node="nb-1", gpu="1") == 5 * 2**30
        assert _metric(text, "bridge_host_cpu_utilization_ratio", node="nb-1") == 0.5

        status = client.get("/_relay/status").json()
        (node,) = status["nodes_detail"]
        assert node["sample"]["gpus"][0]["name"] == "Tesla T4"
        assert node["facts"]["models"] == ["qwen3:8b"]

        page = client.get("/_relay/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "nb-1" in page.text and "Tesla T4 6.0/15.0 GiB" in page.text and "qwen3:8b" in page.text


async def test_bad_values_are_dropped_not_fatal(
    hand_bridge: tuple[Relay, ClientConnection, p.Connection],
) -> None:
    relay, ws, conn = hand_bridge
    conn.send_stats(
        {"kind": "request", "route": "x" * 500, "ttft_s": "fast", "tokens_per_s": -3, "status": "ok"}
    )
    conn.send_stats({"kind": "sample", "gpus": "many", "cpu_percent": float("inf")})
    conn.send_stats({"kind": "what-is-this", "n": 1})
    conn.send_stats({**REQUEST, "completion_tokens": 7})
    await _send(ws, conn)
    with relay.client() as client:
        until(
            lambda: _metric(client.get("/_relay/metrics").text, "bridge_completion_tokens_total") == 7,
            what="the good STATS after the bad ones",
        )
        text = client.get("/_relay/metrics").text
        assert "x" * 65 not in text  # label values are capped
        assert relay.health()["node_connected"]


async def test_status_page_needs_a_key_and_gauges_leave_with_the_node(
    make_relay: Callable[..., Relay],
) -> None:
    relay = make_relay()
    with relay.client() as client:
        anonymous = client.get("/_relay/", headers={"Authorization": "", "Accept": "text/html"})
        assert anonymous.status_code == 303 and anonymous.headers["location"].startswith("/_relay/login")
        async with connect(relay.ws_url + "/_relay/connect") as ws:
            conn = p.Connection(p.Role.BRIDGE)
            await _handshake(ws, conn, "nb-2")
            conn.send_stats(SAMPLE)
            await _send(ws, conn)
            until(
                lambda: (
                    _metric(client.get("/_relay/metrics").text, "bridge_gpu_memory_used_bytes", node="nb-2")
                    is not None
                ),
                what="the GPU gauge",
            )
        until(lambda: not relay.health()["node_connected"], what="the node left")
        assert (
            _metric(client.get("/_relay/metrics").text, "bridge_gpu_memory_used_bytes", node="nb-2") is None
        )
        assert API_KEY not in client.get("/_relay/").text


async def test_stats_that_is_not_json_is_a_protocol_error(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay()
    async with connect(relay.ws_url + "/_relay/connect") as ws:
        conn = p.Connection(p.Role.BRIDGE)
        await _handshake(ws, conn, "nb-3")
        await ws.send(p.encode_frame(p.FrameType.STATS, 0, 0, b"{not json"))
        events: list[p.Event] = []
        with pytest.raises(ConnectionClosedError) as closed:
            async for message in ws:
                if isinstance(message, bytes):
                    events += conn.receive(message)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
        (goaway,) = [e for e in events if isinstance(e, p.GoAwayReceived)]
        assert goaway.code == p.ErrorCode.PROTOCOL_ERROR and "STATS" in goaway.reason
