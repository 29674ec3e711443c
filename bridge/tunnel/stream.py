"""One request/response exchange inside a tunnel: the asyncio side of one stream."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Protocol

from ..errors import StreamError
from ..wire.connection import Connection
from ..wire.events import ResponseReceived

#: Queued after the last chunk: the peer ended its side.
END = object()


class Carrier(Protocol):
    """What a stream needs of the tunnel that carries it (:class:`~bridge.tunnel.tunnel.Tunnel`)."""

    conn: Connection
    streams: dict[int, Stream]

    @property
    def closed(self) -> bool: ...
    def flush(self) -> None: ...
    async def wait_writable(self) -> None: ...
    def forget(self, stream: Stream) -> None: ...


class Stream:
    """One request/response exchange inside the tunnel.

    Readers call :meth:`read` until it returns ``b""`` (the peer's side ended); each call returns the
    credit for the chunk before it, so credit flows back only as fast as the reader forwards data.
    Writers call :meth:`write` (it waits for credit) and finish with ``end=True``.
    """

    def __init__(self, tunnel: Carrier, stream_id: int) -> None:
        self.tunnel = tunnel
        self.id = stream_id
        self._inbox: deque[object] = deque()
        self._readable = asyncio.Event()
        self._credit = asyncio.Event()
        self._unacked = 0
        self.error: StreamError | None = None
        #: The answer's head; None when the stream failed first (:meth:`response` raises then).
        self.head: asyncio.Future[ResponseReceived | None] = asyncio.get_running_loop().create_future()
        self.done = False  # both directions finished or reset
        self.bytes_in = 0
        self.bytes_out = 0
        #: Called once, with why, when the peer resets the stream or the tunnel closes under it
        #: (not on :meth:`reset`, which the owner calls itself): the bridge cancels the stream's
        #: forwarding, so that an upstream stops working for a client that is gone even while it
        #: sends nothing (a prefill, a ``stream: false`` answer).
        self.on_gone: Callable[[str], object] | None = None

    # called by the tunnel -------------------------------------------------------------------------
    def _push(self, item: object) -> None:
        self._inbox.append(item)
        self._readable.set()

    def _fail(self, error: StreamError) -> None:
        if self.error is None:
            self.error = error
        if not self.head.done():
            # Not set_exception: the future would keep the exception, and the traceback it gets
            # when raised would hold the awaiting frames and this stream, a cycle (see failure()).
            self.head.set_result(None)
        self._readable.set()
        self._credit.set()
        self.done = True

    def _wake_writer(self) -> None:
        self._credit.set()

    def _gone(self, why: str) -> None:
        callback, self.on_gone = self.on_gone, None
        if callback is not None:
            callback(why)

    # public ---------------------------------------------------------------------------------------
    def failure(self) -> StreamError:
        """A new exception like :attr:`error` (which must be set), for the caller to raise. The
        stored one is never raised: its traceback's frames would hold this stream, which holds it,
        a cycle only the garbage collector frees (measured: ~40 objects per stream a client left,
        the transports and parsers among them, waiting for the next collection)."""
        error = self.error
        assert error is not None
        return StreamError(error.code, error.reason)

    async def response(self) -> ResponseReceived:
        """The answer's head, once it came. Raises StreamError when the stream failed first."""
        head = await self.head
        if head is None:
            raise self.failure()
        return head

    async def read(self) -> bytes:
        """The next body chunk; ``b""`` once the peer ended its side. Raises StreamError on reset."""
        if self._unacked:
            self.tunnel.conn.acknowledge(self.id, self._unacked)
            self._unacked = 0
            self.tunnel.flush()
        while not self._inbox:
            if self.error is not None:
                raise self.failure()
            self._readable.clear()
            await self._readable.wait()
        item = self._inbox.popleft()
        if item is END:
            return b""
        assert isinstance(item, bytes)
        self._unacked = len(item)
        self.bytes_in += len(item)
        return item

    def ending(self) -> bool:
        """Whether the peer's end is the next thing :meth:`read` returns (it has come already)."""
        return bool(self._inbox) and self._inbox[0] is END

    def chunk_ready(self) -> bool:
        """Whether :meth:`read` returns a body chunk without waiting (one has come already)."""
        return bool(self._inbox) and self._inbox[0] is not END

    async def write(self, data: bytes, *, end: bool = False) -> None:
        """Send body bytes, waiting for flow-control credit and for the WebSocket to drain."""
        conn = self.tunnel.conn
        view = memoryview(data)
        while True:
            if self.error is not None:
                raise self.failure()
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
