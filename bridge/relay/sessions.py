"""Bridges connecting on the WebSocket ``/_relay/connect``: the handshake (HELLO with the node token,
WELCOME), their frames while connected (streams, STATS, GOAWAY), the heartbeat watchdog, and their
going (recorded in the store, their gauges dropped)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time

from ..asgi import Receive, Scope, Send, client_host, text_headers
from ..config import node_name_from, valid_node_name
from ..errors import ProtocolError
from ..tunnel.tunnel import FLUSH_TIMEOUT, Tunnel
from ..wire.connection import Connection, Role
from ..wire.constants import PROTOCOL_VERSION, ErrorCode
from ..wire.events import GoAwayReceived, HelloReceived, StatsReceived
from .auth import Authenticator, same_secret
from .pool import NodeSession, models_of
from .state import RelayState

log = logging.getLogger("bridge.relay")

HELLO_TIMEOUT = 10.0


class Bridges:
    """Every bridge's connection, from its handshake to its end; ``node_token`` is the secret a
    bridge must present in HELLO."""

    def __init__(self, state: RelayState, auth: Authenticator, node_token: str) -> None:
        self.state = state
        self.auth = auth
        self.node_token = node_token

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One bridge's WebSocket, from its handshake to its end."""
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        peer = client_host(scope) or "unknown"
        address = self.auth.address(peer, text_headers(scope["headers"]))
        await send({"type": "websocket.accept"})
        cfg = self.state.config
        conn = Connection(Role.RELAY, window=cfg.window, max_frame=cfg.max_frame, max_streams=cfg.max_streams)

        async def send_bytes(data: bytes) -> None:
            await send({"type": "websocket.send", "bytes": data})

        async def send_text(text: str) -> None:
            await send({"type": "websocket.send", "text": text})

        tunnel = Tunnel(conn, send_bytes, send_text)
        session: NodeSession | None = None
        close_code = 1000
        watchdog: asyncio.Task[None] | None = None
        try:
            hello = await asyncio.wait_for(_read_hello(receive, tunnel), HELLO_TIMEOUT)
            if hello is None:
                close_code = 1008
                return
            if hello.version != PROTOCOL_VERSION:
                conn.reject(ErrorCode.UNSUPPORTED_VERSION, f"relay speaks version {PROTOCOL_VERSION}")
                close_code = 1002
                return
            if not same_secret(hello.token, self.node_token):
                # Counted apart from client failures; the right token is always accepted, so an
                # outsider's guesses never lock the bridge out (docs/security.md §7).
                if self.auth.node_failures.retry_after(address):
                    log.warning("bridge from %s refused: too many wrong node tokens", peer)
                    conn.reject(ErrorCode.UNAUTHORIZED, "too many failed attempts from this address")
                    close_code = 4401
                    return
                log.warning("bridge from %s refused: wrong node token", peer)
                self.auth.node_failures.failed(address)
                conn.reject(ErrorCode.UNAUTHORIZED, "wrong node token")
                close_code = 4401
                return
            if hello.node and not valid_node_name(hello.node):
                # The name becomes a header, a cookie and a metric label: CR/LF in it would break
                # every answer from this node (docs/spec/wire.md §5).
                log.warning("bridge from %s refused: invalid node name %r", peer, hello.node[:80])
                conn.reject(ErrorCode.PROTOCOL_ERROR, "invalid node name")
                close_code = 1002
                return
            session = NodeSession(
                tunnel,
                hello.node or node_name_from(peer),
                frozenset(hello.routes),
                secrets.token_hex(8),
                time.time(),
                hello.info,
                models=models_of(hello.info.get("models")),
            )
            conn.accept(session.session, cfg.heartbeat)
            tunnel.flush()
            await self._add(session)
            log.info(
                "bridge %s connected from %s with routes %s",
                session.node,
                peer,
                ",".join(sorted(session.routes)) or "-",
            )
            watchdog = asyncio.create_task(self._watch(tunnel, send))
            await self._serve(receive, tunnel, session)
        except ProtocolError as exc:
            log.warning("bridge %s broke the protocol: %s", session.node if session else peer, exc)
            tunnel.fail(exc)
            close_code = 1002
        except TimeoutError:
            log.warning("bridge from %s sent no HELLO within %.0f s", peer, HELLO_TIMEOUT)
            close_code = 1008
        finally:
            if watchdog is not None:
                watchdog.cancel()
            with contextlib.suppress(Exception):
                await tunnel.send_now()
            tunnel.close("bridge disconnected")
            await tunnel.aclose()
            if session is not None:
                await self._remove(session)
                log.info("bridge %s disconnected (%s)", session.node, tunnel.close_reason)
            with contextlib.suppress(Exception):  # bounded: a peer that reads nothing holds it
                await asyncio.wait_for(send({"type": "websocket.close", "code": close_code}), FLUSH_TIMEOUT)

    async def _serve(self, receive: Receive, tunnel: Tunnel, session: NodeSession) -> None:
        """The bridge's messages until it disconnects (or gives up with a fatal GOAWAY)."""
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                if message.get("text") is not None:
                    tunnel.feed_text(message["text"])
                continue
            for event in tunnel.feed(data):
                if isinstance(event, StatsReceived):
                    self.state.metrics.stats.publish(session.node, event.body)
                    if event.body.get("kind") == "node" and "models" in event.body:
                        session.models = models_of(event.body["models"])
                elif isinstance(event, GoAwayReceived):
                    session.draining = True
                    if event.code != ErrorCode.NO_ERROR:  # a fatal error: no drain
                        log.warning("bridge %s gave up: %s", session.node, event.reason or event.code)
                        tunnel.close(f"bridge sent GOAWAY {event.code}")
                        await self.state.pool.notify()
                        return
                    log.info("bridge %s is draining (%s)", session.node, event.reason or "no reason")
                    await self.state.pool.notify()

    async def _watch(self, tunnel: Tunnel, send: Send) -> None:
        await tunnel.watchdog(self.state.config.heartbeat * 3)
        if not tunnel.closed:
            log.warning("bridge silent for %.0f s: closing its link", self.state.config.heartbeat * 3)
            tunnel.close("heartbeat timeout")
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})

    async def _add(self, session: NodeSession) -> None:
        self.state.store.record_node(session.node, "connected", session.connected_at)
        self.state.metrics.stats.arrived(session.node)
        await self.state.pool.add(session)
        self.state.metrics.nodes.set(len(self.state.pool.sessions))

    async def _remove(self, session: NodeSession) -> None:
        if await self.state.pool.remove(session):
            self.state.store.record_node(session.node, "disconnected")
            if not any(s.node == session.node for s in self.state.pool.sessions):
                self.state.metrics.stats.forget(session.node)
            self.state.metrics.nodes.set(len(self.state.pool.sessions))

    def close_all(self) -> None:
        """GOAWAY (GOING_AWAY) to every bridge: the relay is shutting down."""
        for session in list(self.state.pool.sessions):
            session.tunnel.conn.send_goaway(ErrorCode.GOING_AWAY, "relay shutting down")
            session.tunnel.flush()


async def _read_hello(receive: Receive, tunnel: Tunnel) -> HelloReceived | None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return None
        if message.get("text") is not None:
            # Answered before HELLO too (docs/spec/wire.md §5), one pong at a time (Tunnel.feed_text).
            tunnel.feed_text(message["text"])
            continue
        for event in tunnel.feed(message.get("bytes") or b""):
            if isinstance(event, HelloReceived):
                return event
        raise ProtocolError("expected HELLO")
