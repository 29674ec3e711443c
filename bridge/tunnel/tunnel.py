"""The asyncio layer both ends share: a :class:`Tunnel` drives one sans-I/O
:class:`~bridge.wire.connection.Connection` over one WebSocket, with a :class:`~bridge.tunnel.stream.Stream`
per request.

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
from collections.abc import Awaitable, Callable

from ..errors import ProtocolError, StreamError
from ..wire import events as ev
from ..wire.connection import Connection
from ..wire.constants import MAX_MESSAGE, PING, PONG, ErrorCode
from .stream import END, Stream

log = logging.getLogger("bridge.tunnel")

SendBytes = Callable[[bytes], Awaitable[None]]
SendText = Callable[[str], Awaitable[None]]

#: Writers wait while this many bytes sit queued for the WebSocket (bounds memory under load).
HIGH_WATER = 4 * 1024 * 1024
#: Seconds :meth:`Tunnel.send_now` waits for the WebSocket by default (a peer that stopped reading).
FLUSH_TIMEOUT = 5.0
#: Seconds a tunnel whose WebSocket refused a send waits for its owner's reader to close it.
SEND_FAILED_GRACE = 5.0


class Tunnel:
    """One live tunnel connection, either role. See the module docstring."""

    def __init__(
        self,
        conn: Connection,
        send_bytes: SendBytes,
        send_text: SendText,
        *,
        on_open: Callable[[Stream, ev.StreamOpened], None] | None = None,
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
        #: Held while messages taken from the core are being sent: the writer takes every queued
        #: message at once and awaits each, so send_now() must wait for the ones it has taken.
        self._sending = asyncio.Lock()
        self.last_rx = time.monotonic()
        self.goaway: ev.GoAwayReceived | None = None
        self.close_reason = ""
        #: Seconds the writer holds queued frames after the first so that more join one message
        #: (WELCOME's extra key ``coalesce``: a relay billed per incoming message asks for it).
        self.coalesce = 0.0
        self._close_timer: asyncio.TimerHandle | None = None
        #: The pong being sent: pings that come meanwhile get none (a peer that pings without
        #: reading would otherwise pile up a task and a queued pong per ping).
        self._pong_task: asyncio.Task[None] | None = None
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
            raise StreamError(ErrorCode.GOING_AWAY, "tunnel closed")

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                if self.coalesce > 0 and self.conn.bytes_queued < MAX_MESSAGE:
                    await asyncio.sleep(self.coalesce)  # heartbeats go out apart (send_text)
                self._wake.clear()
                await self._send_queued()
                self._drained.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The WebSocket broke, or the peer's close came (a send after it fails). Messages that
            # came before that close may still wait for the owner's reader, a stream's last frames
            # among them: failing every stream now would cut answers that are complete. The reader
            # closes the tunnel once it reaches the end; a timer does if it never does.
            log.debug("tunnel writer stopped: %r", exc)
            loop = asyncio.get_running_loop()
            self._close_timer = loop.call_later(SEND_FAILED_GRACE, self.close, f"send failed: {exc!r}")

    async def send_now(self, timeout: float = FLUSH_TIMEOUT) -> bool:
        """Write what is queued at once (used before closing the WebSocket). Returns once every
        message the writer had already taken is sent too, so that closing loses none of them; False
        when that took longer than ``timeout`` seconds (a peer that stopped reading: the close that
        follows drops the rest)."""
        try:
            async with asyncio.timeout(timeout):
                await self._send_queued()
        except TimeoutError:
            return False
        return True

    async def _send_queued(self) -> None:
        """Send every message the core has queued. The writer and send_now() both come here: the
        lock makes one wait until the messages the other took are sent."""
        async with self._sending:
            for message in self.conn.data_to_send():
                await self._send_bytes(message)

    # ------------------------------------------------------------------------------------ input
    def feed(self, message: bytes) -> list[ev.Event]:
        """Process one binary message. Returns the events the owner must handle itself (HELLO,
        WELCOME, GOAWAY, OPEN when no on_open callback is set); stream events are dispatched here.
        Raises ProtocolError: the owner must then call :meth:`fail` and close the WebSocket."""
        self.last_rx = time.monotonic()
        events = self.conn.receive(message)
        rest: list[ev.Event] = []
        for event in events:
            stream = self.streams.get(getattr(event, "stream_id", 0))
            if isinstance(event, ev.DataReceived):
                if stream is not None:
                    if event.data:
                        stream._push(event.data)
                    if event.end_stream:
                        stream._push(END)
                else:  # nobody reads it any more: give the credit straight back
                    self.conn.acknowledge(event.stream_id, len(event.data))
            elif isinstance(event, ev.WindowUpdated):
                if stream is not None:
                    stream._wake_writer()
            elif isinstance(event, ev.ResponseReceived):
                if stream is not None and not stream.head.done():
                    stream.head.set_result(event)
                    if event.end_stream:
                        stream._push(END)
            elif isinstance(event, ev.StreamReset):
                if stream is not None:
                    stream._fail(StreamError(event.code, event.reason))
                    self.streams.pop(event.stream_id, None)
                    stream._gone("client gone" if event.code == ErrorCode.CANCEL else "reset by the peer")
            elif isinstance(event, ev.StreamOpened) and self._on_open is not None:
                stream = self.add_stream(event.stream_id)
                if event.end_stream:
                    stream._push(END)
                self._on_open(stream, event)
            else:
                if isinstance(event, ev.GoAwayReceived):
                    self.goaway = event
                rest.append(event)
        self.flush()
        return rest

    def feed_text(self, text: str) -> None:
        """Process one text message: the heartbeat."""
        self.last_rx = time.monotonic()
        if text == PING and (self._pong_task is None or self._pong_task.done()):
            self._pong_task = asyncio.get_running_loop().create_task(self._pong())

    async def _pong(self) -> None:
        with contextlib.suppress(Exception):
            await self._send_text(PONG)

    async def heartbeat(self, interval: float, timeout: float) -> None:
        """Send PING every ``interval`` seconds; return when nothing arrived for ``timeout``."""
        while not self.closed:
            silent = time.monotonic() - self.last_rx
            if silent > timeout:
                return
            with contextlib.suppress(Exception):
                # Bounded: on a dead path with the WebSocket's buffers full a send waits for ever,
                # and the silence would never be noticed (the check above is the only one).
                await asyncio.wait_for(self._send_text(PING), max(0.05, timeout - silent))
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
        if self._close_timer is not None:
            self._close_timer.cancel()
        self.close_reason = reason
        self._closed.set()
        self._drained.set()
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream._fail(StreamError(ErrorCode.GOING_AWAY, f"tunnel closed: {reason}"))
            stream._gone("tunnel closed")

    async def aclose(self) -> None:
        """Close and stop the writer. Frames still queued are dropped: call :meth:`send_now`
        first where they matter (a drain)."""
        self.close()
        self._writer.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._writer
