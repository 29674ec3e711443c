"""An in-process relay for unit tests: the real ASGI application, called directly, with nodes whose
tunnels write into a list instead of a WebSocket (no sockets, no processes)."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bridge import wire
from bridge.config import RelayConfig
from bridge.relay.app import Relay
from bridge.relay.pool import NodeSession
from bridge.relay.store import Store
from bridge.tunnel.tunnel import Tunnel

KEY = "bk_unit0001_a-client-key-for-unit-tests"


def make_relay(tmp_path: Path, **config: Any) -> Relay:
    settings = {"api_keys": (KEY,), "grace": 0.0, **config}
    return Relay(RelayConfig(data_dir=tmp_path / "relay", **settings), Store(tmp_path / "relay"))


@dataclass
class Node:
    """A node as the relay sees it, and every frame the relay sent it."""

    session: NodeSession
    sent: list[bytes] = field(default_factory=list)
    #: Set when the relay sent the node an OPEN.
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def frames(self, kind: int | None = None) -> list[wire.Frame]:
        out = [f for message in self.sent for f in wire.iter_frames(message)]
        return [f for f in out if kind is None or f.type == kind]


async def add_node(relay: Relay, routes: set[str], name: str = "n1") -> Node:
    conn = wire.Connection(wire.Role.RELAY)
    node = Node(None)  # type: ignore[arg-type]

    async def send_bytes(data: bytes) -> None:
        node.sent.append(data)
        if any(f.type == wire.FrameType.OPEN for f in wire.iter_frames(data)):
            node.opened.set()

    async def send_text(text: str) -> None:
        pass

    tunnel = Tunnel(conn, send_bytes, send_text)
    conn.accept("s-" + name, 5.0)
    node.session = NodeSession(tunnel, name, frozenset(routes), "s-" + name, time.time())
    await relay.pool.add(node.session)
    return node


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def http_scope(method: str, path: str, headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    raw, _, query = path.partition("?")
    return {
        "type": "http",
        "method": method,
        "path": raw,
        "raw_path": raw.encode(),
        "query_string": query.encode(),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers or []],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
        "scheme": "http",
    }


async def call(
    relay: Relay,
    method: str,
    path: str,
    body: bytes = b"",
    headers: list[tuple[str, str]] | None = None,
    timeout: float = 10,
) -> Answer:
    """One HTTP request through the relay's ASGI app, with the client key."""
    head = [("authorization", f"Bearer {KEY}"), *(headers or [])]
    if body:
        head.append(("content-length", str(len(body))))
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await gone.wait()  # the client stays until the answer is whole
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await asyncio.wait_for(relay(http_scope(method, path, head), receive, send), timeout)
    gone.set()
    start = next(m for m in sent if m["type"] == "http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, data)


async def websocket(relay: Relay, path: str, timeout: float = 10) -> Answer:
    """A client WebSocket's handshake through the relay's ASGI app; the HTTP answer of a refusal."""
    scope = {
        **http_scope("GET", path, [("authorization", f"Bearer {KEY}")]),
        "type": "websocket",
        "scheme": "ws",
        "extensions": {"websocket.http.response": {}},
    }
    scope.pop("method")
    messages = [{"type": "websocket.connect"}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await asyncio.wait_for(relay(scope, receive, send), timeout)
    start = next(m for m in sent if m["type"] == "websocket.http.response.start")
    data = b"".join(m.get("body", b"") for m in sent if m["type"] == "websocket.http.response.body")
    return Answer(start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, data)
