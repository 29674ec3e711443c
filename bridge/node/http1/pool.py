"""The :class:`Client`: a pool of kept-alive connections per origin, and the writing of a request
(its head, then its body while the answer is awaited). See the package's docstring."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterable, Iterable
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from ...errors import UpstreamError, UpstreamUnreachable
from .connection import Closed, Connection, Response

#: Seconds an idle kept-alive connection stays open (aiohttp's connector keeps 15, Ollama never
#: closes an idle one; uvicorn, Open WebUI's server, closes after 5, which the pool notices).
KEEPALIVE = 30.0
#: Idle connections kept per origin; more are closed when they come back.
MAX_IDLE = 64
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


class Client:
    """The bridge's HTTP/1.1 client: :meth:`request` forwards one request and returns its answer's
    head; :meth:`get_json` asks an upstream for a small JSON document. Made inside the running
    loop; :meth:`close` closes the idle connections."""

    def __init__(self, connect_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        self._idle: dict[Origin, list[Connection]] = {}
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
            except Closed:
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

    async def _connection(self, key: Origin) -> Connection:
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
                    lambda: Connection(self, key, loop), key.host, key.port, ssl=tls
                )
        except TimeoutError as exc:
            raise UpstreamUnreachable(
                f"no connection to {key.host}:{key.port} within {self.connect_timeout:g} s", timeout=True
            ) from exc
        except OSError as exc:
            raise UpstreamUnreachable(f"cannot connect to {key.host}:{key.port}: {exc}") from exc
        return protocol

    def put(self, conn: Connection) -> None:
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

    def _sweep(self, idle: list[Connection], now: float) -> None:
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


async def _send_body(conn: Connection, response: Response, body: AsyncIterable[bytes], chunked: bool) -> None:
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
