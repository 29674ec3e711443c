"""One connection to an upstream and the answer it carries (see the package's docstring).

A :class:`Connection` is an asyncio.Protocol whose bytes go to httptools; its callbacks fill the
:class:`Response` the connection carries now (one request at a time). The answer buffers its body
for :meth:`Response.chunks`, pauses the upstream past :data:`READ_HIGH_WATER`, and gives its
connection back to the pool (:class:`Pool`, the :class:`~bridge.node.http1.pool.Client`) when it
can be used again.
"""

from __future__ import annotations

import asyncio
import collections
import copy
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Protocol, cast

import httptools

from ...errors import UpstreamError
from ...httprules import header

if TYPE_CHECKING:
    from .pool import Origin

#: Bytes of answer buffered before the upstream's connection is paused.
READ_HIGH_WATER = 256 * 1024
#: Bytes of a request body buffered toward the upstream before its writer waits.
WRITE_HIGH_WATER = 256 * 1024


class Pool(Protocol):
    """Where a connection goes back once its answer was read (the Client)."""

    def put(self, conn: Connection) -> None: ...


class Response:
    """One answer: ``status`` and ``headers`` (as sent, Latin-1 text) once :meth:`Client.request`
    returned, then the body from :meth:`chunks`. The caller must end it with :meth:`release` when
    the body was read to its end (the connection goes back to the pool) or :meth:`close`."""

    def __init__(self, conn: Connection, method: str) -> None:
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._conn = conn
        self._head_only = method == "HEAD"
        self._head: asyncio.Future[None] = conn.loop.create_future()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._interim = False
        self._until_close = False
        self._keep_alive = False
        #: The whole answer arrived.
        self.complete = False
        #: Whether any byte of the answer arrived (a stale connection's failure comes before any).
        self.answered = False
        self._sending: asyncio.Task[None] | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: what is buffered at each step, joined. Raises
        :class:`UpstreamError` when the connection fails before the body's end."""
        conn = self._conn
        while True:
            if self._chunks:
                data = self._chunks.popleft() if len(self._chunks) == 1 else b"".join(self._chunks)
                self._chunks.clear()
                if self._buffered > READ_HIGH_WATER:
                    conn.resume_reading()
                self._buffered = 0
                yield data
                continue
            if self._error is not None:
                raise _fresh(self._error)
            if self.complete:
                return
            self._waiter = conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def read(self) -> bytes:
        """The whole body."""
        return b"".join([c async for c in self.chunks()])

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool when it can be used again
        (the answer complete, the request's body all sent, the upstream keeping it alive). A body
        whose sending failed closed the connection (:func:`.pool._send_body`), which the pool refuses."""
        conn = self._conn
        reusable = (
            self.complete
            and not self._until_close
            and not self._head_only
            and (self._sending is None or self._sending.done())
            and self._keep_alive
        )
        if reusable:
            conn.response = None
            conn.client.put(conn)
        else:
            self.close()

    def close(self) -> None:
        """Done with the answer, read or not: its connection is closed."""
        if self._sending is not None and not self._sending.done():
            self._sending.cancel()
        self._conn.close()

    # -- what the connection reports (httptools callbacks go through Connection) --

    def _status_line(self, status: int) -> None:
        self.status = status
        self.answered = True

    def _headers_complete(self) -> None:
        status = self.status
        if 100 <= status < 200 and status != 101:
            self._interim = True  # 100 Continue, 103 Early Hints: the answer comes after
            self.headers = []
            return
        if self._head_only or status == 101:
            self._finish()
        elif status not in (204, 304):
            chunked = "chunked" in (header(self.headers, "transfer-encoding") or "").lower()
            self._until_close = header(self.headers, "content-length") is None and not chunked
        if not self._head.done():
            self._head.set_result(None)

    def _body(self, data: bytes) -> None:
        if self.complete:
            return  # a HEAD answer's announced body is never read
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > READ_HIGH_WATER:
            self._conn.pause_reading()
        self._wake()

    def _message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        # asked now: llhttp forgets the message's flags once this callback returns
        parser = self._conn.parser
        self._keep_alive = parser is not None and parser.should_keep_alive()
        self._finish()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _failed(self, exc: BaseException) -> None:
        if not self._head.done():
            self._head.set_exception(exc)
            return
        if self.complete:
            return
        if self._until_close and isinstance(exc, Closed):
            self._finish()  # a body read until the connection closes has ended
            return
        self._error = exc.with_traceback(None)  # its frames would hold this answer: a cycle
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


def _fresh(exc: BaseException) -> BaseException:
    """A copy of a stored error, to raise: the stored one then never gets a traceback, whose frames
    would hold its holder (a cycle, left for the garbage collector with a connection in it)."""
    try:
        return copy.copy(exc)
    except Exception:  # an exception type that cannot be copied: raise it as it is
        return exc


class Closed(UpstreamError):
    """The upstream closed the connection."""


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream, carrying one request at a time."""

    def __init__(self, client: Pool, key: Origin, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.key = key
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        #: None once the connection is lost (see connection_lost).
        self.parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.closed = False
        self.reused = False
        self.idle_since = 0.0
        self._reading_paused = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of it
        # A request body's writer waits once this much is buffered (asyncio's default, 64 KiB,
        # held uploads to 0.86x of aiohttp's client, which checks only every 64 KiB written).
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)

    def data_received(self, data: bytes) -> None:
        response, parser = self.response, self.parser
        if response is None or parser is None:
            self.close()  # bytes nobody asked for on an idle connection: it cannot be trusted again
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # 101: the answer ended with its head (_headers_complete)
        except httptools.HttpParserError as exc:
            response._failed(UpstreamError(f"not an HTTP/1.1 answer: {exc}"))
            self.close()

    def eof_received(self) -> bool | None:
        return False  # close the transport: a half-closed upstream connection is of no use

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(Closed("the upstream closed the connection"))
        response = self.response
        if response is not None:
            response._failed(Closed(f"the upstream closed the connection{f': {exc}' if exc else ''}"))
        # The parser, the transport and the answer each point back at this connection: let go of
        # them, so that reference counting frees a closed connection at once (else each one waited
        # for the garbage collector, its transport and parser with it).
        self.parser = None
        self.transport = None
        self.response = None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- httptools callbacks --

    def on_status(self, status: bytes) -> None:
        assert self.response is not None and self.parser is not None
        self.response._status_line(self.parser.get_status_code())

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        assert self.response is not None
        self.response._headers_complete()

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._body(body)

    def on_message_complete(self) -> None:
        assert self.response is not None
        self.response._message_complete()

    # -- the client's side --

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise Closed("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise Closed("the upstream closed the connection")
        if self._writing_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True
