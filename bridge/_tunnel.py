"""The asyncio layer shared by both ends: a :class:`Tunnel` drives one sans-I/O
:class:`~bridge.protocol.Connection` over one WebSocket, with a stream object per request.

The owner (relay or bridge) reads WebSocket messages and hands them to :meth:`Tunnel.feed` /
:meth:`Tunnel.feed_text`; the tunnel's writer task sends what the core queues, coalescing frames that
pile up while a send is in progress into one message. Heartbeats and the dead-link timeout live here,
in the I/O layer, not in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import protocol as p
from ._exceptions import ProtocolError, StreamError

log = logging.getLogger("bridge.tunnel")

SendBytes = Callable[[bytes], Awaitable[None]]
SendText = Callable[[str], Awaitable[None]]

#: Writers wait while this many bytes sit queued for the WebSocket (bounds memory under load).
HIGH_WATER = 4 * 1024 * 1024

_END = object()


class Stream:
    """One request/response exchange inside the tunnel.

    Readers call :meth:`read` until it returns ``b""`` (the peer's side ended); each call returns the
    credit for the chunk before it, so credit flows back only as fast as the reader forwards data.
    Writers call :meth:`write` (it waits for credit) and finish with ``end=True``.
    """

    def __init__(self, tunnel: Tunnel, stream_id: int) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self._inbox: deque[object] = deque()
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._unacked = 0
        self.error: StreamError | None = None
        self.head: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.done = False  # both directions finished or reset
        self.bytes_in = 0
        self.bytes_out = 0

    # called by the tunnel -------------------------------------------------------------------------
    def _push(self, item: object) -> None:
        self._inbox.append(item)
        self._readable.set()

    def _fail(self, error: StreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            self.head.set_exception(error)
            self.head.exception()  # mark retrieved: a stream reset before anyone awaited its head
        self._readable.set()
        self._credit.set()
        self.done = True

    def _wake_writer(self) -> None:
        self._credit.set()

    # public ---------------------------------------------------------------------------------------
    async def read(self) -> bytes:
        """The next body chunk; ``b""`` once the peer ended its side. Raises StreamError on reset."""
        if self._unacked:
            self.tunnel.conn.acknowledge(self.id, self._unacked)
            self._unacked = 0
            self.tunnel.flush()
        while not self._inbox:
            if self.error is not None:
                raise self.error
            self._readable.clear()
            await self._readable.wait()
        item = self._inbox.popleft()
        if item is _END:
            return b""
        assert isinstance(item, bytes)
        self._unacked = len(item)
        self.bytes_in += len(item)
        return item

    async def write(self, data: bytes, *, end: bool = False) -> None:
        """Send body bytes, waiting for flow-control credit and for the WebSocket to drain."""
        conn = self.tunnel.conn
        view = memoryview(data)
        while True:
            if self.error is not None:
                raise self.error
            await self.tunnel.wait_writable()
            window = conn.send_window(self.id)
            if window <= 0 and view:
                self._credit.clear()
                await self._credit.wait()
                continue
            chunk = bytes(view[:window])
            view = view[len(chunk) :]
            last = end and not view
            conn.send_data(self.id, chunk, end_stream=last)
            self.bytes_out += len(chunk)
            self.tunnel.flush()
            if not view:
                return

    def reset(self, code: int, reason: str = "") -> None:
        """Abort the stream both ways (tells the peer unless it is already gone)."""
        if self.done:
            return
        self.tunnel.conn.send_reset(self.id, code, reason)
        self.tunnel.flush()
        self._fail(StreamError(code, reason))
        self.tunnel.streams.pop(self.id, None)


class Tunnel:
    """One live tunnel connection, either role. See the module docstring."""

    def __init__(
        self,
        conn: p.Connection,
        send_bytes: SendBytes,
        send_text: SendText,
        *,
        on_open: Callable[[Stream, p.StreamOpened], None] | None = None,
    ) -> None:
        self.conn = conn
        self._send_bytes = send_bytes
        self._send_text = send_text
        self._on_open = on_open
        self.streams: dict[int, Stream] = {}
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = asyncio.Event()
        self.last_rx = time.monotonic()
        self.goaway: p.GoAwayReceived | None = None
        self.close_reason = ""
        #: Seconds the writer holds queued frames after the first so that more join one message
        #: (WELCOME's extra key ``coalesce``: a relay billed per incoming message asks for it).
        self.coalesce = 0.0
        self._writer = asyncio.create_task(self._write_loop(), name="tunnel-writer")

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    # ------------------------------------------------------------------------------------ output
    def flush(self) -> None:
        """Wake the writer task: queued frames go out on its next turn."""
        if self.conn.bytes_queued:
            self._wake.set()
            if self.conn.bytes_queued > HIGH_WATER:
                self._drained.clear()

    async def wait_writable(self) -> None:
        if not self._drained.is_set():
            await self._drained.wait()
        if self.closed:
            raise StreamError(p.ErrorCode.GOING_AWAY, "tunnel closed")

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                if self.coalesce > 0 and self.conn.bytes_queued < p.MAX_MESSAGE:
                    await asyncio.sleep(self.coalesce)  # heartbeats go out apart (send_text)
                self._wake.clear()
                for message in self.conn.data_to_send():
                    await self._send_bytes(message)
                self._drained.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the WebSocket broke: the reader notices and closes the tunnel
            log.debug("tunnel writer stopped: %r", exc)
            self.close(f"send failed: {exc!r}")

    async def send_now(self) -> None:
        """Write what is queued at once (used before closing the WebSocket)."""
        for message in self.conn.data_to_send():
            await self._send_bytes(message)

    # ------------------------------------------------------------------------------------ input
    def feed(self, message: bytes) -> list[p.Event]:
        """Process one binary message. Returns the events the owner must handle itself (HELLO,
        WELCOME, GOAWAY, OPEN when no on_open callback is set); stream events are dispatched here.
        Raises ProtocolError: the owner must then call :meth:`fail` and close the WebSocket."""
        self.last_rx = time.monotonic()
        events = self.conn.receive(message)
        rest: list[p.Event] = []
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0))
            if isinstance(event, p.DataReceived):
                if stream is not None:
                    if event.data:
                        stream._push(event.data)
                    if event.end_stream:
                        stream._push(_END)
                else:  # nobody reads it any more: give the credit straight back
                    self.conn.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, p.WindowUpdated):
                if stream is not None:
                    stream._wake_writer()
            elif isinstance(event, p.ResponseReceived):
                if stream is not None and not stream.head.done():
                    stream.head.set_result(event)
                    if event.end_stream:
                        stream._push(_END)
            elif isinstance(event, p.StreamReset):
                if stream is not None:
                    stream._fail(StreamError(event.code, event.reason))
                    self.streams.pop(event.stream_id, None)
            elif isinstance(event, p.StreamOpened) and self._on_open is not None:
                stream = self.add_stream(event.stream_id)
                if event.end_stream:
                    stream._push(_END)
                self._on_open(stream, event)
            else:
                if isinstance(event, p.GoAwayReceived):
                    self.goaway = event
                rest.append(event)
        self.flush()
        return rest

    def feed_text(self, text: str) -> None:
        """Process one text message: the heartbeat."""
        self.last_rx = time.monotonic()
        if text == p.PING:
            asyncio.get_running_loop().create_task(self._pong())

    async def _pong(self) -> None:
        with contextlib.suppress(Exception):
            await self._send_text(p.PONG)

    async def heartbeat(self, interval: float, timeout: float) -> None:
        """Send PING every ``interval`` seconds; return when nothing arrived for ``timeout``."""
        while not self.closed:
            silent = time.monotonic() - self.last_rx
            if silent > timeout:
                return
            with contextlib.suppress(Exception):
                await self._send_text(p.PING)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), min(interval, max(0.05, timeout - silent)))

    async def watchdog(self, timeout: float) -> None:
        """Return when nothing arrived for ``timeout`` seconds (the peer sends the heartbeat)."""
        while not self.closed:
            silent = time.monotonic() - self.last_rx
            if silent > timeout:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._closed.wait(), timeout - silent + 0.05)

    # ------------------------------------------------------------------------------------ streams
    def add_stream(self, stream_id: int) -> Stream:
        stream = Stream(self, stream_id)
        self.streams[stream_id] = stream
        return stream

    def forget(self, stream: Stream) -> None:
        """The owner is done with a stream (both sides ended normally)."""
        stream.done = True
        self.streams.pop(stream.id, None)

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def fail(self, exc: ProtocolError) -> None:
        """A fatal protocol error from the peer: queue GOAWAY with its code and close."""
        self.conn.send_goaway(exc.code, str(exc))
        self.flush()
        self.close(f"protocol error: {exc}")

    def close(self, reason: str = "closed") -> None:
        """Fail every open stream and stop the writer. The owner closes the WebSocket."""
        if self.closed:
            return
        self.close_reason = reason
        self._closed.set()
        self._drained.set()
        for stream in list(self.streams.values()):
            stream._fail(StreamError(p.ErrorCode.GOING_AWAY, f"tunnel closed: {reason}"))
        self.streams.clear()

    async def aclose(self) -> None:
        """Close and stop the writer. Frames still queued are dropped: call :meth:`send_now`
        first where they matter (a drain)."""
        self.close()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer
