"""The bridge's HTTP/1.1 client toward its upstreams (Ollama, Open WebUI, an engine on loopback).

Why not a library: aiohttp's client (used until issue 18) was about a third of the bridge's CPU per
small request on the 2-core benchmark machine (its request and response objects, cookie and
redirect machinery, and timers are made for every request); httpx's pool cost more. What the bridge
needs is narrow: forward a request exactly as the client sent it (no headers of its own, no cookies,
no decompression, no redirects followed) and stream the answer's bytes as they arrive. The parsing,
the part that must be right, is httptools (llhttp, the parser of Node.js, which uvicorn uses too);
this module only keeps connections and moves bytes.

What it does, checked against aiohttp's client (client_reqrep.py, connector.py) and RFC 9112:

- One pool of kept-alive connections per (host, port, https), the most recently used first; a
  connection idle for :data:`KEEPALIVE` seconds is not reused (it is closed when the pool next looks
  at its origin, no timer per connection), at most :data:`MAX_IDLE` wait per origin.
- A request body goes as it comes (``Content-Length`` when the client gave one, else chunked); a
  body-less request other than GET, HEAD, OPTIONS and TRACE says ``Content-Length: 0``, as aiohttp
  does. The body is sent while the answer is awaited (an upstream may answer before reading it).
- Interim answers (1xx but 101) are skipped; 101 ends the answer (WebSockets go another way,
  bridge/node/upstream.py ``forward_ws``). A body that ends with the connection (no length, not
  chunked) is read until then. The answer to HEAD has no body: its connection is not reused, since
  httptools cannot be told to skip the body its ``Content-Length`` announces.
- An upstream that reads faster than the tunnel carries is paused once :data:`READ_HIGH_WATER` bytes
  wait, and resumed when they went on.
- A kept-alive connection the upstream closed while it was idle (the race every client has) is
  retried once on a new connection, for a request without a body, when no byte of the answer came.

Errors: :class:`~bridge.errors.UpstreamUnreachable` when no connection could be made (``timeout``
set when it took longer than the connect timeout), :class:`~bridge.errors.UpstreamError` when the
connection failed or the upstream answered something that is not HTTP/1.1.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from functools import lru_cache
from typing import Any, NamedTuple, cast
from urllib.parse import urlsplit

import httptools

from ..errors import UpstreamError, UpstreamUnreachable
from ..httprules import header

#: Seconds an idle kept-alive connection stays open (aiohttp's connector keeps 15, Ollama never
#: closes an idle one; uvicorn, Open WebUI's server, closes after 5, which the pool notices).
KEEPALIVE = 30.0
#: Idle connections kept per origin; more are closed when they come back.
MAX_IDLE = 64
#: Bytes of answer buffered before the upstream's connection is paused.
READ_HIGH_WATER = 256 * 1024
#: Bytes of a request body buffered toward the upstream before its writer waits.
WRITE_HIGH_WATER = 256 * 1024
#: Methods that say nothing about a body they do not have (aiohttp's client_reqrep.py does the same).
_NO_BODY_LENGTH = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "CONNECT"})
#: Request headers the client writes itself: the body's framing and the connection's own.
_OWN = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})


class Origin(NamedTuple):
    """Where an upstream URL points: the pool's key, and the path prefix of its targets."""

    host: str
    port: int
    https: bool
    base: str


@lru_cache(maxsize=256)
def origin(url: str) -> Origin:
    """The :class:`Origin` of an ``http://`` or ``https://`` URL (a route's upstream)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UpstreamError(f"not an http(s) URL: {url!r}")
    https = parts.scheme == "https"
    return Origin(parts.hostname, parts.port or (443 if https else 80), https, parts.path.rstrip("/"))


class Response:
    """One answer: ``status`` and ``headers`` (as sent, Latin-1 text) once :meth:`Client.request`
    returned, then the body from :meth:`chunks`. The caller must end it with :meth:`release` when
    the body was read to its end (the connection goes back to the pool) or :meth:`close`."""

    def __init__(self, conn: _Connection, method: str) -> None:
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
        whose sending failed closed the connection (:func:`_send_body`), which the pool refuses."""
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

    # -- what the connection reports (httptools callbacks go through _Connection) --

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
        if self._until_close and isinstance(exc, _Closed):
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


class _Closed(UpstreamError):
    """The upstream closed the connection."""


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to an upstream, carrying one request at a time."""

    def __init__(self, client: Client, key: Origin, loop: asyncio.AbstractEventLoop) -> None:
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
            self._drain.set_exception(_Closed("the upstream closed the connection"))
        response = self.response
        if response is not None:
            response._failed(_Closed(f"the upstream closed the connection{f': {exc}' if exc else ''}"))
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
            raise _Closed("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self) -> None:
        if self.closed:
            raise _Closed("the upstream closed the connection")
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


class Client:
    """The bridge's HTTP/1.1 client: :meth:`request` forwards one request and returns its answer's
    head; :meth:`get_json` asks an upstream for a small JSON document. Made inside the running
    loop; :meth:`close` closes the idle connections."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[Origin, list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None
        self._closing = False

    async def request(
        self,
        method: str,
        url: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterable[bytes] | None = None,
    ) -> Response:
        """Send ``method`` ``target`` (exactly as given, under ``url``'s path) with ``headers``
        (``Host`` among them: nothing is added but the body's framing) and ``body``; return once
        the answer's head arrived. The caller reads :meth:`Response.chunks` and then calls
        :meth:`Response.release` (or :meth:`Response.close`)."""
        key = origin(url)
        path = key.base + target if target else key.base or "/"
        head, chunked = _request_head(method, path, headers, body is not None)
        for attempt in (0, 1):
            conn = await self._connection(key)
            response = Response(conn, method)
            conn.response = response
            try:
                conn.write(head)
                if body is not None:
                    response._sending = asyncio.create_task(_send_body(conn, response, body, chunked))
                await response._head
                return response
            except _Closed:
                response.close()
                if attempt == 0 and conn.reused and body is None and not response.answered:
                    continue  # the upstream closed a kept-alive connection as we reused it
                raise
            except BaseException:
                response.close()
                raise
        raise AssertionError("unreachable")

    async def get_json(
        self, url: str, path: str, headers: Iterable[tuple[str, str]], timeout: float
    ) -> tuple[int, Any]:
        """GET ``path`` from ``url`` within ``timeout`` seconds: its status and its body as JSON
        (None unless 200). Raises :class:`UpstreamError`, ``TimeoutError`` or ``ValueError``."""
        async with asyncio.timeout(timeout):
            response = await self.request("GET", url, path, headers)
            try:
                data = await response.read()
            except BaseException:
                response.close()
                raise
            response.release()
        return response.status, json.loads(data) if response.status == 200 else None

    async def _connection(self, key: Origin) -> _Connection:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest to be alive and warm
            if not conn.closed and now - conn.idle_since < KEEPALIVE:
                conn.reused = True
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        tls = None
        if key.https:
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, key, loop), key.host, key.port, ssl=tls
                )
        except TimeoutError as exc:
            raise UpstreamUnreachable(
                f"no connection to {key.host}:{key.port} within {self.connect_timeout:g} s", timeout=True
            ) from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {key.host}:{key.port}: {exc}") from exc
        return protocol

    def put(self, conn: _Connection) -> None:
        """A connection whose answer was read to its end, back to the pool."""
        if self._closing or conn.closed:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.setdefault(conn.key, [])
        idle.append(conn)
        if len(idle) > MAX_IDLE:
            idle.pop(0).close()
        self._sweep(idle, conn.idle_since)

    def _sweep(self, idle: list[_Connection], now: float) -> None:
        """Close the connections idle for longer than KEEPALIVE (the oldest are first)."""
        while idle and (idle[0].closed or now - idle[0].idle_since >= KEEPALIVE):
            idle.pop(0).close()

    async def close(self) -> None:
        """Close every idle connection (those in use are closed by their answers' owners)."""
        self._closing = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _request_head(
    method: str, target: str, headers: Iterable[tuple[str, str]], has_body: bool
) -> tuple[bytes, bool]:
    """The request's head, and whether its body (``has_body``) goes chunked."""
    lines = [f"{method} {target} HTTP/1.1\r\n"]
    length: str | None = None
    for name, value in headers:
        lname = name.lower()
        if lname in _OWN:
            if lname == "content-length":
                length = value
            continue
        lines.append(f"{name}: {value}\r\n")
    text = "".join(lines)
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise UpstreamError("a header name or value holds a line break")
    chunked = False
    if not has_body:
        text += "\r\n" if method in _NO_BODY_LENGTH else "Content-Length: 0\r\n\r\n"
    elif length is not None and length.isdigit():
        text += f"Content-Length: {length}\r\n\r\n"
    else:
        text, chunked = text + "Transfer-Encoding: chunked\r\n\r\n", True
    return text.encode("latin-1"), chunked


async def _send_body(
    conn: _Connection, response: Response, body: AsyncIterable[bytes], chunked: bool
) -> None:
    """Send a request's body on ``conn``; a failure (the client went away, the connection closed)
    ends the answer with it and closes the connection."""
    try:
        async for chunk in body:
            if not chunk:
                continue
            if chunked:
                conn.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                conn.write(chunk)
            await conn.drain()
        if chunked:
            conn.write(b"0\r\n\r\n")
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        response._failed(exc)
        conn.close()
