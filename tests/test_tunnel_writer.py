"""The tunnel's writer task and :meth:`Tunnel.send_now` (bridge/tunnel/tunnel.py), over real
sans-I/O cores: a drain sends what is queued, then closes; nothing the writer already took from the
core may be lost by that close (a response the relay then sees cut)."""

from __future__ import annotations

import asyncio

from bridge import wire as p
from bridge.tunnel.tunnel import Tunnel
from bridge.wire.constants import MAX_MESSAGE

from .test_protocol import deliver, pair


async def test_send_now_waits_for_the_messages_the_writer_took_so_a_close_loses_none() -> None:
    # More than one WebSocket message queued at once: the writer takes both from the core and
    # is still sending the first when the drain calls send_now() and then closes the tunnel.
    relay, bridge = pair(window=4 * MAX_MESSAGE)
    relay.open_stream(1, "GET", "ollama", "/api/pull", [])
    deliver(relay, bridge)
    body = b"x" * (MAX_MESSAGE + MAX_MESSAGE // 2)
    bridge.send_response(1, 200, [("content-type", "application/octet-stream")])
    bridge.send_data(1, body, end_stream=True)

    sent: list[bytes] = []
    writing = asyncio.Event()
    release = asyncio.Event()

    async def send_bytes(message: bytes) -> None:
        if not sent and not release.is_set():
            writing.set()
            await release.wait()  # the socket is slow with the first message
        sent.append(message)

    async def send_text(_text: str) -> None:
        pass

    tunnel = Tunnel(bridge, send_bytes, send_text)
    try:
        tunnel.flush()
        await writing.wait()
        assert bridge.bytes_queued == 0  # the writer holds both messages now
        drain = asyncio.create_task(tunnel.send_now())
        # The socket frees up only after send_now() has had its first turn (ready callbacks run in
        # order): a send_now() that does not wait for the writer has returned by then.
        asyncio.get_running_loop().call_soon(release.set)
        await drain
        assert len(sent) == 2, "send_now() returned while the writer still held messages"
    finally:
        await tunnel.aclose()
    events = [e for m in sent for e in relay.receive(m)]
    data = [e for e in events if isinstance(e, p.DataReceived)]
    assert b"".join(e.data for e in data) == body
    assert data[-1].end_stream  # the END the relay would otherwise miss


async def test_send_now_gives_up_on_a_peer_that_stopped_reading() -> None:
    # The socket never takes the message: send_now() returns False after its timeout instead of
    # holding up the close for ever, and the close that follows stops the writer.
    relay, bridge = pair()
    relay.open_stream(1, "GET", "ollama", "/api/tags", [])
    deliver(relay, bridge)
    stuck = asyncio.Event()

    async def send_bytes(_message: bytes) -> None:
        await stuck.wait()  # never set

    async def send_text(_text: str) -> None:
        pass

    tunnel = Tunnel(bridge, send_bytes, send_text)
    try:
        bridge.send_response(1, 200, [])
        tunnel.flush()
        assert await tunnel.send_now(timeout=0.05) is False
    finally:
        await tunnel.aclose()
    assert tunnel.closed
