"""The asyncio side of one stream (bridge/tunnel/stream.py) over real sans-I/O cores and the real
Tunnel: a stream the peer reset is freed by reference counting alone once its reader and writer
caught the error (a client that went away mid-answer must not leave its stream, and what it holds,
for the garbage collector)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

from bridge import wire as p
from bridge.errors import StreamError
from bridge.tunnel.stream import Stream
from bridge.tunnel.tunnel import Tunnel

from .test_protocol import deliver, pair


def _tunnel(conn: p.Connection) -> Tunnel:
    """A Tunnel over ``conn`` whose WebSocket takes everything and sends nothing anywhere."""

    async def send(_message: bytes | str) -> None:
        pass

    return Tunnel(conn, send, send)


def _freed_by_reference_counting(make: Callable[[], Coroutine[Any, Any, weakref.ref[Stream]]]) -> bool:
    """Run ``make`` (it returns a weak reference to the stream it used) with the garbage collector
    off: whether the stream is gone once nothing refers to it."""
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(make())() is None
    finally:
        gc.enable()


async def _reset_stream_caught_by_reader_and_writer() -> weakref.ref[Stream]:
    relay, bridge = pair()
    relay.open_stream(1, "GET", "ollama", "/api/chat", [])
    deliver(relay, bridge)
    tunnel = _tunnel(bridge)
    stream = tunnel.add_stream(1)
    relay.send_reset(1, p.ErrorCode.CANCEL, "client went away")
    for message in relay.data_to_send():
        tunnel.feed(message)
    errors: list[int] = []
    for attempt in (stream.read(), stream.write(b"more")):
        try:
            await attempt
        except StreamError as exc:
            errors.append(exc.code)
    assert errors == [p.ErrorCode.CANCEL, p.ErrorCode.CANCEL]
    assert stream.error is not None and stream.error.__traceback__ is None  # the stored one
    await tunnel.aclose()
    return weakref.ref(stream)


def test_a_reset_stream_is_freed_without_the_garbage_collector() -> None:
    assert _freed_by_reference_counting(_reset_stream_caught_by_reader_and_writer), (
        "the reset stream is held in a cycle (its error's traceback)"
    )


async def _reset_before_its_head() -> weakref.ref[Stream]:
    relay, bridge = pair()
    tunnel = _tunnel(relay)
    relay.open_stream(1, "GET", "ollama", "/api/tags", [])
    stream = tunnel.add_stream(1)
    deliver(relay, bridge)
    bridge.send_reset(1, p.ErrorCode.UPSTREAM_UNREACHABLE, "refused")
    for message in bridge.data_to_send():
        tunnel.feed(message)
    try:
        await stream.response()
    except StreamError as exc:
        assert exc.code == p.ErrorCode.UPSTREAM_UNREACHABLE
    else:
        raise AssertionError("response() returned for a stream reset before its head")
    await tunnel.aclose()
    return weakref.ref(stream)


def test_a_stream_reset_before_its_head_raises_and_is_freed_without_the_collector() -> None:
    assert _freed_by_reference_counting(_reset_before_its_head), (
        "the stream reset before its head is held in a cycle"
    )
