"""The tunnel's writer task and :meth:`Tunnel.send_now` (bridge/tunnel/tunnel.py), over real
sans-I/O cores: a drain sends what is queued, then closes; nothing the writer already took from the
core may be lost by that close, and a send that fails because the peer's close came must not fail
the streams whose last frames came before that close (either way the relay would cut a response
that was complete)."""

from __future__ import annotations

import asyncio

import pytest

from bridge import wire as p
from bridge.errors import StreamError
from bridge.tunnel import tunnel as tunnel_module
from bridge.tunnel.tunnel import Tunnel
from bridge.wire.constants import MAX_MESSAGE, PING, PONG

from .test_protocol import deliver, pair


async def _no_text(_text: str) -> None:
    """The heartbeat's sender: these tests send none."""


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

    tunnel = Tunnel(bridge, send_bytes, _no_text)
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

    tunnel = Tunnel(bridge, send_bytes, _no_text)
    try:
        bridge.send_response(1, 200, [])
        tunnel.flush()
        assert await tunnel.send_now(timeout=0.05) is False
    finally:
        await tunnel.aclose()
    assert tunnel.closed


def _refusing_tunnel(relay: p.Connection, refused: asyncio.Event) -> Tunnel:
    """A Tunnel over ``relay`` whose WebSocket refuses every send, as one whose peer's close came
    (``refused`` is set at the first)."""

    async def send_bytes(_message: bytes) -> None:
        refused.set()
        raise ConnectionResetError("the peer closed the WebSocket")

    return Tunnel(relay, send_bytes, _no_text)


def _answer_then_close(stream_id: int) -> tuple[p.Connection, list[bytes]]:
    """A relay core with ``stream_id`` open, and the bridge's whole answer to it (head, body,
    end): the messages that sit in the relay's WebSocket queue, ahead of the bridge's close."""
    relay, bridge = pair()
    relay.open_stream(stream_id, "GET", "up", "/small", [])
    deliver(relay, bridge)
    bridge.send_response(stream_id, 200, [("content-type", "application/json")])
    bridge.send_data(stream_id, b'{"ok": true}', end_stream=True)
    return relay, bridge.data_to_send()


async def test_a_send_refused_after_the_peers_close_leaves_earlier_answers_whole() -> None:
    # The bridge drained: its last answer's END and then its close reach the relay in one read.
    # uvicorn queues both for the app and answers the close at once, so a send the relay makes
    # before its reader got there is refused (ClientDisconnected). The answer is still whole.
    relay, queued = _answer_then_close(1)
    refused = asyncio.Event()
    tunnel = _refusing_tunnel(relay, refused)
    try:
        stream = tunnel.add_stream(1)
        relay.open_stream(3, "GET", "up", "/small", [])  # a new request for the leaving bridge
        tunnel.flush()
        await refused.wait()  # the writer's send failed (and it handled that in the same step)
        for message in queued:  # the reader reaches what came before the close
            tunnel.feed(message)
        tunnel.close("bridge disconnected")  # then the disconnect itself
        head = await stream.response()
        assert head.status == 200
        assert await stream.read() == b'{"ok": true}'
        assert await stream.read() == b""
    finally:
        await tunnel.aclose()


async def test_a_tunnel_whose_send_failed_closes_itself_if_its_reader_never_does(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tunnel_module, "SEND_FAILED_GRACE", 0.05)
    relay, _ = _answer_then_close(1)
    tunnel = _refusing_tunnel(relay, asyncio.Event())
    try:
        stream = tunnel.add_stream(1)
        relay.open_stream(3, "GET", "up", "/small", [])
        tunnel.flush()
        async with asyncio.timeout(10):
            await tunnel.wait_closed()
        assert tunnel.close_reason.startswith("send failed")
        with pytest.raises(StreamError):
            await stream.response()
    finally:
        await tunnel.aclose()


async def test_pings_from_a_peer_that_reads_nothing_pile_up_no_pongs() -> None:
    """A peer that pings without reading (anyone, before the relay's HELLO check, did 1.5 M
    pings: 350 MB of tasks and queued pongs): one pong is sent at a time, pings meanwhile get none."""
    relay, _ = pair()
    sending = asyncio.Event()
    release = asyncio.Event()
    sent: list[str] = []

    async def send_text(text: str) -> None:
        sent.append(text)
        sending.set()
        await release.wait()  # the peer reads nothing: the send waits

    async def no_bytes(_message: bytes) -> None:
        pass

    tunnel = Tunnel(relay, no_bytes, send_text)
    try:
        for _ in range(1000):
            tunnel.feed_text(PING)
        await sending.wait()
        for _ in range(1000):
            tunnel.feed_text(PING)
        assert sent == [PONG]
        release.set()
        assert tunnel._pong_task is not None
        await tunnel._pong_task  # its send returned: the next ping gets a pong again
        tunnel.feed_text(PING)
        await tunnel._pong_task
        assert sent == [PONG, PONG]
    finally:
        await tunnel.aclose()
