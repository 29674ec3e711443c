"""The relay's one forwarding path, on the real ASGI app in process (nodes are tunnels that write
into a list): every kind of request checks that the node serves its route before anything reaches
it, and only a header block too large becomes a 431."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from bridge import wire

from .relayapp import KEY, add_node, call, http_scope, make_relay, websocket


async def test_every_forwarding_path_checks_the_route_before_opening_a_stream(tmp_path: Path) -> None:
    """A node that announced routes gets nothing for another route, whatever kind of request it is:
    proxied, shared (a deterministic body), a job, a client WebSocket (on main only the proxied one
    was checked: the others reached the node)."""
    relay = make_relay(tmp_path)
    node = await add_node(relay, {"a"})
    unknown = {"error": "unknown route 'b'"}

    plain = await call(relay, "GET", "/r/b/x")
    shared = await call(relay, "POST", "/r/b/api/chat", json.dumps({"model": "m", "temperature": 0}).encode())
    assert (plain.status, json.loads(plain.body)) == (404, unknown)
    assert (shared.status, json.loads(shared.body)) == (404, unknown)
    assert shared.headers["x-bridge-idempotent"] == "new"

    job = await call(relay, "POST", "/_relay/jobs", json.dumps({"route": "b", "path": "/x"}).encode())
    assert job.status == 202
    done = json.loads((await call(relay, "GET", json.loads(job.body)["url"] + "?wait=10")).body)
    assert done["state"] == "failed" and done["response"]["status"] == 404
    assert json.loads(done["response"]["body"]) == unknown and done["error"] == unknown["error"]

    socket = await websocket(relay, "/r/b/ws")
    assert (socket.status, json.loads(socket.body)) == (404, unknown)

    assert node.frames(wire.FrameType.OPEN) == []  # nothing reached the node
    assert relay.metrics.in_flight == 0


async def test_a_node_that_can_open_no_more_streams_is_not_picked_and_is_no_431(tmp_path: Path) -> None:
    """A connection whose stream ids are used up can open no stream: the relay picks another node
    or, with none, answers 503 like any request without a bridge (on main the core's ValueError
    "stream ids must increase" became "431 request header fields too large")."""
    relay = make_relay(tmp_path)
    node = await add_node(relay, {"a"})
    node.session.tunnel.conn.last_stream_id = wire.MAX_STREAM_ID
    answer = await call(relay, "GET", "/r/a/x")
    assert answer.status == 503, answer
    assert json.loads(answer.body) == {"error": "no bridge is connected; try again shortly"}
    fresh = await add_node(relay, {"a"}, name="n2")
    task = asyncio.create_task(call(relay, "GET", "/r/a/x"))
    await asyncio.wait_for(fresh.opened.wait(), 10)  # the other node gets it
    task.cancel()
    assert node.frames(wire.FrameType.OPEN) == []


async def test_only_a_header_block_too_large_is_a_431(tmp_path: Path) -> None:
    """Headers that fit the HTTP head but not the 64 KiB header block (JSON doubles every ``"``)."""
    relay = make_relay(tmp_path)
    node = await add_node(relay, {"a"})
    quotes = '"' * 40_000
    answer = await call(relay, "GET", "/r/a/x", headers=[("x-quotes", quotes)])
    assert (answer.status, json.loads(answer.body)) == (431, {"error": "request header fields too large"})
    shared = await call(relay, "POST", "/r/a/x", b'{"temperature": 0}', headers=[("x-quotes", quotes)])
    assert shared.status == 431 and json.loads(shared.body) == {"error": "request header fields too large"}
    assert node.frames(wire.FrameType.OPEN) == []


async def _leaving_client(tmp_path: Path, *, before_a_node: bool) -> list[tuple[int, bytes]]:
    """A GET to a node that never answers, whose client leaves (``http.disconnect`` from
    receive): before any node is connected (``before_a_node``) or while the node works. Returns
    the RESET frames (stream id, payload) the node got."""
    relay = make_relay(tmp_path, grace=30.0)
    scope = http_scope("GET", "/r/a/x", [("authorization", f"Bearer {KEY}")])
    gone = asyncio.Event()
    first = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if first:
            return first.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(_message: Any) -> None:
        pass

    task = asyncio.create_task(relay(scope, receive, send))
    if before_a_node:
        gone.set()  # the relay hears of it once a stream is open
        node = await add_node(relay, {"a"})
    else:
        node = await add_node(relay, {"a"})
        await asyncio.wait_for(node.opened.wait(), 10)
        gone.set()
    await asyncio.wait_for(task, 10)  # the request ends: the relay does not wait for an answer
    assert relay.metrics.in_flight == 0
    return [(f.stream_id, f.payload) for f in node.frames(wire.FrameType.RESET)]


@pytest.mark.parametrize("before_a_node", [False, True], ids=["while-the-node-works", "before-a-node"])
async def test_a_client_that_leaves_resets_its_stream(tmp_path: Path, before_a_node: bool) -> None:
    """Whenever the client leaves, the node is told (RESET CANCEL) so that it stops working, and
    the relay frees the request, also when the client left while the request waited for a node."""
    resets = await _leaving_client(tmp_path, before_a_node=before_a_node)
    assert len(resets) == 1
    _, payload = resets[0]
    assert int.from_bytes(payload[:4], "big") == wire.ErrorCode.CANCEL
    assert payload[4:] == b"client went away"
