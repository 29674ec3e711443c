"""A WebSocket carried by a stream (docs/protocol.md, client WebSockets): its messages as records in
the stream's DATA, both ways. The relay splices a client's WebSocket to a stream, the bridge a stream
to the upstream's WebSocket; both use these helpers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

from ..wire.constants import WS_BINARY, WS_CLOSE, WS_TEXT
from ..wire.records import WsRecordReader, encode_ws_close, encode_ws_record
from .stream import Stream


async def send_message(stream: Stream, message: str | bytes) -> None:
    """One WebSocket message (text or binary) as a record."""
    if isinstance(message, str):
        await stream.write(encode_ws_record(WS_TEXT, message.encode()))
    else:
        await stream.write(encode_ws_record(WS_BINARY, message))


async def send_close(stream: Stream, code: int, reason: str = "") -> None:
    """The closing handshake's record, which ends this side of the stream."""
    await stream.write(encode_ws_close(code, reason), end=True)


async def records(stream: Stream) -> AsyncIterator[tuple[int, bytes]]:
    """The ``(opcode, payload)`` records the peer sends, until its CLOSE record (yielded last) or
    the end of its side. Raises ProtocolError (reset the stream) on a malformed record."""
    reader = WsRecordReader()
    while chunk := await stream.read():
        for opcode, payload in reader.feed(chunk):
            yield opcode, payload
            if opcode == WS_CLOSE:
                return


async def splice(
    first: Coroutine[Any, Any, None],
    second: Coroutine[Any, Any, None],
    on_failure: Callable[[BaseException], Awaitable[None]],
    *,
    linger: float = 5.0,
) -> None:
    """Run the two directions of a WebSocket until one ends, then cancel the other. A direction that
    raised is handed to ``on_failure`` (which may raise it on). When ``second`` ended first (its
    side closed), ``first`` gets ``linger`` seconds to carry the answer to that close."""
    tasks = [asyncio.create_task(first), asyncio.create_task(second)]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if exc is not None:
                await on_failure(exc)
        if tasks[1] in done and not tasks[0].done():
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(tasks[0], linger)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
