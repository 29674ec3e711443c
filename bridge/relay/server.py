"""Serving the relay: uvicorn with the two request-head bounds its httptools protocol lacks (a time
limit and a size limit), a drain before it stops, and the sockets bound by the relay itself (so
that asyncio sets TCP_NODELAY on what they accept)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any, cast

import uvicorn

from ..asgi import HOLD_HEAD
from ..config import RelayConfig
from ..wire.constants import MAX_HEADER_BLOCK, MAX_MESSAGE
from .app import Relay
from .auth import hash_key, new_key
from .store import Store

log = logging.getLogger("bridge.relay")

#: Seconds a client has to send a whole request head; then 408 and the connection closes (a
#: slowloris client, or a socket opened and left idle, holds nothing for longer).
HEAD_TIMEOUT = 10.0
#: The largest request head (request line and headers) read: a larger one gets 431 and is never
#: buffered in full. The same bound as the tunnel's header block.
MAX_HEAD_BYTES = MAX_HEADER_BLOCK
#: Seconds a connection answered before its request body's end still reads (and drops) that body
#: before it closes, so that the client can finish sending and read the answer.
LINGER = 5.0

_RESPONSE_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_RESPONSE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b'content-length: 45\r\nconnection: close\r\n\r\n{"error": "request header fields too large"}\n'
)


def _guarded_protocol() -> Any:
    """uvicorn's httptools protocol with the two bounds it lacks (HEAD_TIMEOUT, MAX_HEAD_BYTES)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    except ImportError:  # no httptools: uvicorn's h11 protocol limits the head size itself
        return "auto"

    class HeldHeadCycle(RequestResponseCycle):
        """uvicorn's cycle, writing a response head marked :data:`~bridge.asgi.HOLD_HEAD` together
        with the body that follows it: one write (and one TCP segment for a small response)."""

        _held: bytes | None = None

        async def send(self, message: Any) -> None:
            if message["type"] == "http.response.start" and message.get(HOLD_HEAD):
                real = self.transport
                held = _Held(real)
                self.transport = cast(Any, held)
                try:
                    await super().send(message)
                finally:
                    self.transport = real
                self._held = b"".join(held.parts)
                return
            if self._held is None:
                await super().send(message)
                return
            real = self.transport
            prefixed = _Held(real, self._held)
            self.transport = cast(Any, prefixed)
            self._held = None
            try:
                await super().send(message)
            finally:
                self.transport = real
                prefixed.release()

    class GuardedHttp(HttpToolsProtocol):
        head_timeout = HEAD_TIMEOUT

        def connection_made(self, transport: Any) -> None:
            self._head_bytes = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._refused = False
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(self.head_timeout, self._too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _refuse(self, response: bytes) -> None:
            self._disarm()
            if not self._refused and not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()
            self._refused = True

        def _too_slow(self) -> None:
            self._head_timer = None
            log.info("closing a connection from %s: no complete request head in %.0f s", *self._peer())
            self._refuse(_RESPONSE_408)

        def _peer(self) -> tuple[str, float]:
            return (self.client[0] if self.client else "unknown", self.head_timeout)

        def _count(self, n: int) -> None:
            self._head_bytes += n
            if self._head_bytes > MAX_HEAD_BYTES and not self._refused:
                log.info("refusing a request head over %d bytes from %s", MAX_HEAD_BYTES, self._peer()[0])
                self._refuse(_RESPONSE_431)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _start_asgi_task(self, cycle: Any, app: Any) -> None:
            cycle.__class__ = HeldHeadCycle
            super()._start_asgi_task(cycle, app)

        def data_received(self, data: bytes) -> None:
            if not self._refused:
                super().data_received(data)

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._head_bytes = 0
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            if not self._refused:
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            if not self._refused:
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            if not self._refused:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            # (A pipelined cycle after it has not answered yet: response_complete tells them apart.)
            if cycle is not None and cycle.response_complete and cycle.more_body:
                self._linger()

        def _linger(self) -> None:
            """Answered before its whole request body came (a 401, a 413, an early answer): the
            connection could serve nothing more until that body has passed, and nothing times a
            body out here (uvicorn's keep-alive timer stops at its first byte), so a client
            sending a byte now and then held it for ever. It serves nothing more: the answer's
            end goes out (FIN), what the client still sends is read and dropped for
            :data:`LINGER` seconds (closing with unread data would reset the connection, and the
            client could lose the answer while still sending), then it is closed (RFC 9112 §9.6)."""
            if self.transport.is_closing():
                return
            self._refused = True  # data_received drops what comes: nothing more is parsed
            self._disarm()
            if self.transport.can_write_eof():
                self.transport.write_eof()
            self.loop.call_later(LINGER, self.transport.close)

    return GuardedHttp


class _Held:
    """The transport a :class:`HeldHeadCycle` writes through. Without ``head``: it keeps what is
    written (the response head). With ``head``: the first write (or a close, or :meth:`release`)
    puts the head first; everything else goes to the real transport."""

    def __init__(self, transport: Any, head: bytes | None = None) -> None:
        self.transport = transport
        self.head = head
        self.parts: list[bytes] = []

    def write(self, data: bytes) -> None:
        if self.head is None:
            self.parts.append(data)
            return
        head, self.head = self.head, b""
        self.transport.write(head + data if head else data)

    def close(self) -> None:
        self.release()
        self.transport.close()

    def release(self) -> None:
        """Write the head if nothing did yet."""
        if self.head:
            head, self.head = self.head, b""
            if not self.transport.is_closing():
                self.transport.write(head)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.transport, name)


class _Server(uvicorn.Server):
    """uvicorn's server with a drain step before it stops: on SIGINT/SIGTERM the relay refuses new
    requests, waits for those in flight (up to drain_timeout), sends GOAWAY to bridges, then exits.
    A second signal exits at once."""

    relay: Relay
    on_ready: Callable[[], None] | None = None

    async def startup(self, sockets: list[Any] | None = None) -> None:
        await super().startup(sockets)
        if self.on_ready is not None and self.started:
            self.on_ready()

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit or getattr(self, "_draining", False):
            self.force_exit = True
            self.should_exit = True
            return
        self._draining = True
        log.info(
            "signal %s: draining %d request(s) in flight",
            signal.Signals(sig).name,
            self.relay.metrics.in_flight,
        )
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(self._start_drain, loop)

    def _start_drain(self, loop: asyncio.AbstractEventLoop) -> None:
        # Held here: the loop keeps only a weak reference to a task (asyncio's create_task docs).
        self._drain_task = loop.create_task(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        await self.relay.drain(self.relay.config.drain_timeout)
        self.should_exit = True


def ensure_first_key(store: Store, config: RelayConfig) -> str | None:
    """Create a client key when none exists at all; return it (to be shown once) or None."""
    if config.api_keys or store.key_hashes():
        return None
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "first key")
    return key


async def serve(config: RelayConfig, *, ready: Callable[[Relay, list[int]], None] | None = None) -> None:
    """Run the relay until a signal (see :class:`_Server`)."""
    store = Store(config.data_dir)
    relay = Relay(config, store)
    sockets = []
    bound: list[int] = []
    for port in [config.port, *config.route_ports.keys()]:
        family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, port))
        sock.set_inheritable(True)
        sockets.append(sock)
        bound.append(sock.getsockname()[1])
    uv = uvicorn.Config(
        relay,
        log_level="warning",
        access_log=False,
        lifespan="on",
        http=_guarded_protocol(),
        ws="websockets-sansio",
        ws_max_size=2 * MAX_MESSAGE,
        ws_ping_interval=None,
        ws_ping_timeout=None,
        proxy_headers=False,
        timeout_graceful_shutdown=int(config.drain_timeout) + 5,
        server_header=False,
        date_header=False,
    )
    server = _Server(uv)
    server.relay = relay
    server.on_ready = (lambda: ready(relay, bound)) if ready is not None else None
    try:
        await server.serve(sockets=sockets)
    finally:
        store.close()
