"""The relay: the public side. An ASGI application (served by uvicorn) that

* accepts bridges on the WebSocket ``/_relay/connect`` (HELLO with the node token, then streams);
* serves clients: the default route at ``/``, every route at ``/r/<route>/...``, a route at the root
  of an extra port (``--route-port``), and its own endpoints under ``/_relay/``;
* authenticates clients (bearer key, ``X-Bridge-Key`` or the login cookie) and never forwards its own
  credentials;
* holds requests while no bridge is connected, for ``grace`` seconds, then answers 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import secrets
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote

import prometheus_client as prom
import uvicorn

from . import __version__
from . import wire as p
from ._auth import COOKIE_NAME, CookieSigner, FailureLimiter, KeyRing, hash_key, new_key, same_secret
from ._config import RelayConfig
from ._http import failure_words, header, is_loopback, strip_hop_by_hop
from ._jobs import Jobs
from ._pages import login_page, status_page
from ._shared import Shared, SharedCache
from ._stats import RelayStats
from ._store import Store
from .errors import HeadersTooLarge, ProtocolError, SharedOverflow, StreamError
from .metrics import RateLimiter
from .tunnel.stream import Stream
from .tunnel.tunnel import Tunnel

log = logging.getLogger("bridge.relay")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HELLO_TIMEOUT = 10.0
#: Request bodies up to this size (with a Content-Length) are read before a node is chosen.
BUFFER_LIMIT = 1024 * 1024
#: The reason of the RESET a relay sends when a client stopped sending its request body.
BODY_STALLED = "request body stalled"
#: Stream failures that mean the node never answered: the request may go to another node, once.
RETRY_CODES = frozenset({p.ErrorCode.REFUSED_STREAM, p.ErrorCode.GOING_AWAY, p.ErrorCode.TOO_MANY_STREAMS})
#: Cookie that keeps a browser on the node that served it (Open WebUI's state lives on one node).
NODE_COOKIE = "bridge_node"
#: Request headers the relay sets itself; a client's values are dropped.
FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-forwarded-prefix")


@dataclass(frozen=True)
class Want:
    """What a request needs from a node."""

    route: str
    model: str | None = None
    sticky: str | None = None  # the node this browser used before
    exclude: frozenset[NodeSession] = frozenset()


@dataclass(frozen=True)
class Answer:
    """A JSON response the relay gives in the upstream's place: a request it cannot forward, or one
    whose stream failed before the answer came. The same bytes on every path (plain, shared by
    repeated requests, jobs), so every client of one request sees the same complete response."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> tuple[list[tuple[str, str]], bytes]:
        """The headers (no Content-Length) and the body."""
        head = [("content-type", "application/json"), ("cache-control", "no-store"), *self.headers]
        return head, json.dumps(self.body).encode()


#: No bridge came within ``grace`` seconds.
NO_BRIDGE = Answer(503, {"error": "no bridge is connected; try again shortly"}, (("retry-after", "10"),))
RELAY_DRAINING = Answer(503, {"error": "relay is shutting down"}, (("retry-after", "5"),))
HEAD_TOO_LARGE = Answer(431, {"error": "request header fields too large"})
INVALID_HEAD = Answer(502, {"error": "bridge: invalid response from the upstream"})


def unknown_route(route: str) -> Answer:
    return Answer(404, {"error": f"unknown route {route!r}"})


def stream_failed(code: int, route: str) -> Answer:
    """The answer to a stream reset with ``code`` before its response: words from the code alone
    (the bridge's reason may name an upstream's address: it goes to the logs, not to clients)."""
    status, words = failure_words(code, route)
    return Answer(status, {"error": words, "code": code}, (("retry-after", "5"),) if status == 503 else ())


async def send_answer(send: Send, answer: Answer) -> None:
    headers, body = answer.encode()
    head = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    head.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": answer.status, "headers": head})
    await send({"type": "http.response.body", "body": body})


@dataclass(frozen=True)
class _Request:
    method: str
    route: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes | None  # None: streamed from the client, not kept
    client: str


@dataclass(eq=False)
class NodeSession:
    """A connected bridge."""

    tunnel: Tunnel
    node: str
    routes: frozenset[str]
    session: str
    connected_at: float
    info: dict[str, Any] = field(default_factory=dict)
    draining: bool = False
    #: Models the node serves (HELLO ``models`` or a STATS ``node`` frame); empty: unknown, any.
    models: frozenset[str] = frozenset()

    @property
    def load(self) -> int:
        return len(self.tunnel.streams)


class Relay:
    """The ASGI application. ``store`` persists keys and timestamps; see :func:`serve`."""

    def __init__(self, config: RelayConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.node_token = config.node_token or store.secret("node_token")
        self.keys = KeyRing(store, config.api_keys)
        self.cookies = CookieSigner(store.secret("cookie_secret"))
        self.sessions: list[NodeSession] = []
        self._changed = asyncio.Condition()
        self.in_flight = 0
        self.websockets = 0  # client WebSockets open
        self.waiting = 0
        self.draining = False
        self.started_at = time.time()
        #: Failed logins, client keys and node tokens per client address (brute force -> 429).
        self.failures = FailureLimiter(config.login_rate)
        #: Per client key id: a token bucket of --key-rate requests a second (used when key_rate > 0).
        self._key_buckets: dict[str, RateLimiter] = {}
        self.registry = prom.CollectorRegistry()
        self.m_requests = prom.Counter(
            "bridge_relay_requests",
            "Requests proxied, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.m_in_flight = prom.Gauge(
            "bridge_relay_requests_in_flight", "Requests in flight", registry=self.registry
        )
        self.m_nodes = prom.Gauge("bridge_relay_nodes_connected", "Bridges connected", registry=self.registry)
        self.m_bytes = prom.Counter(
            "bridge_relay_body_bytes", "Body bytes proxied", ["direction"], registry=self.registry
        )
        self.m_ttfb = prom.Histogram(
            "bridge_relay_time_to_first_byte_seconds",
            "From request to the first response body byte, seen by the relay",
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.stats = RelayStats(self.registry)
        self.m_retries = prom.Counter(
            "bridge_relay_retries",
            "Requests retried on another node after theirs vanished",
            registry=self.registry,
        )
        self.m_joined = prom.Counter(
            "bridge_relay_idempotent_joins",
            "Repeated requests served from a generation in flight or finished",
            registry=self.registry,
        )
        self._turn = 0
        self.shared = SharedCache(config.idempotency_ttl, config.idempotency_entries, config.shared_max_bytes)
        self.jobs = Jobs(self, store)
        self._background: set[asyncio.Task[None]] = set()
        # Nodes the last run saw connected and never saw leave (it was killed): they left when it
        # was last known alive.
        alive = store.get_meta("alive_at")
        store.close_dangling(float(alive) if alive else time.time())

    # =================================================================================== ASGI entry
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            if scope["path"] == "/_relay/connect":
                await self._bridge_socket(scope, receive, send)
            else:
                await self._client_ws(scope, receive, send)
        elif kind == "lifespan":
            keep_alive: asyncio.Task[None] | None = None
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    keep_alive = asyncio.create_task(self._keep_alive())
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    if keep_alive is not None:
                        keep_alive.cancel()
                    await self.close_sessions()
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    async def _keep_alive(self) -> None:
        """Note in the store, every few seconds, that the relay is alive (see ``close_dangling``)."""
        while True:
            self.store.set_meta("alive_at", repr(time.time()))
            await asyncio.sleep(min(5.0, self.config.heartbeat))

    # =================================================================================== bridges
    async def _bridge_socket(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        peer = _client_addr(scope)
        retry = self.failures.retry_after(_limit_key(scope))
        if retry:
            log.warning("bridge from %s refused: too many failed attempts", peer)
            await _ws_deny(
                scope,
                send,
                429,
                {"error": "too many failed attempts from this address"},
                [("retry-after", str(retry))],
            )
            return
        await send({"type": "websocket.accept"})
        conn = p.Connection(
            p.Role.RELAY,
            window=self.config.window,
            max_frame=self.config.max_frame,
            max_streams=self.config.max_streams,
        )

        async def send_bytes(data: bytes) -> None:
            await send({"type": "websocket.send", "bytes": data})

        async def send_text(text: str) -> None:
            await send({"type": "websocket.send", "text": text})

        tunnel = Tunnel(conn, send_bytes, send_text)
        session: NodeSession | None = None
        close_code = 1000
        watchdog: asyncio.Task[None] | None = None
        try:
            hello = await asyncio.wait_for(self._read_hello(receive, tunnel), HELLO_TIMEOUT)
            if hello is None:
                close_code = 1008
                return
            if hello.version != p.PROTOCOL_VERSION:
                conn.reject(p.ErrorCode.UNSUPPORTED_VERSION, f"relay speaks version {p.PROTOCOL_VERSION}")
                close_code = 1002
                return
            if not same_secret(hello.token, self.node_token):
                log.warning("bridge from %s refused: wrong node token", peer)
                self.failures.failed(_limit_key(scope))
                conn.reject(p.ErrorCode.UNAUTHORIZED, "wrong node token")
                close_code = 4401
                return
            session = NodeSession(
                tunnel,
                hello.node or peer,
                frozenset(hello.routes),
                secrets.token_hex(8),
                time.time(),
                hello.info,
                models=_models(hello.info.get("models")),
            )
            conn.accept(session.session, self.config.heartbeat)
            tunnel.flush()
            await self._add_session(session)
            log.info(
                "bridge %s connected from %s with routes %s",
                session.node,
                peer,
                ",".join(sorted(session.routes)) or "-",
            )
            watchdog = asyncio.create_task(self._watch(tunnel, send))
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is not None:
                    for event in tunnel.feed(data):
                        if isinstance(event, p.StatsReceived):
                            self.stats.publish(session.node, event.body)
                            if event.body.get("kind") == "node" and "models" in event.body:
                                session.models = _models(event.body["models"])
                        elif isinstance(event, p.GoAwayReceived):
                            session.draining = True
                            if event.code != p.ErrorCode.NO_ERROR:  # a fatal error: no drain
                                log.warning("bridge %s gave up: %s", session.node, event.reason or event.code)
                                tunnel.close(f"bridge sent GOAWAY {event.code}")
                                await self._notify()
                                break
                            log.info("bridge %s is draining (%s)", session.node, event.reason or "no reason")
                            await self._notify()
                elif message.get("text") is not None:
                    tunnel.feed_text(message["text"])
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
                await self._remove_session(session)
                log.info("bridge %s disconnected (%s)", session.node, tunnel.close_reason)
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": close_code})

    async def _read_hello(self, receive: Receive, tunnel: Tunnel) -> p.HelloReceived | None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return None
            if message.get("text") is not None:
                tunnel.feed_text(message["text"])
                continue
            for event in tunnel.feed(message.get("bytes") or b""):
                if isinstance(event, p.HelloReceived):
                    return event
            raise ProtocolError("expected HELLO")

    async def _watch(self, tunnel: Tunnel, send: Send) -> None:
        await tunnel.watchdog(self.config.heartbeat * 3)
        if not tunnel.closed:
            log.warning("bridge silent for %.0f s: closing its link", self.config.heartbeat * 3)
            tunnel.close("heartbeat timeout")
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011})

    async def _add_session(self, session: NodeSession) -> None:
        self.sessions.append(session)
        self.store.record_node(session.node, "connected", session.connected_at)
        self.m_nodes.set(len(self.sessions))
        await self._notify()

    async def _remove_session(self, session: NodeSession) -> None:
        if session in self.sessions:
            self.sessions.remove(session)
            self.store.record_node(session.node, "disconnected")
            if not any(s.node == session.node for s in self.sessions):
                self.stats.forget(session.node)
            self.m_nodes.set(len(self.sessions))
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _pick(self, want: Want) -> NodeSession | None:
        """The node for a request: one that serves the route (and the model, where nodes say which
        they serve), the browser's own node first (sticky), then the least outstanding streams; ties
        go round-robin. Draining nodes and ``want.exclude`` get nothing new."""
        live = [
            s
            for s in self.sessions
            if not s.draining and not s.tunnel.closed and s.tunnel.conn.can_open and s not in want.exclude
        ]
        serving = [s for s in live if want.route in s.routes] or live
        if want.model:
            known = [s for s in serving if _serves(s.models, want.model)]
            serving = known or [s for s in serving if not s.models] or serving
        if want.sticky:
            for s in serving:
                if s.node == want.sticky:
                    return s
        if not serving:
            return None
        self._turn += 1
        least = min(s.load for s in serving)
        tied = [s for s in serving if s.load == least]
        return tied[self._turn % len(tied)]

    async def _acquire(self, want: Want) -> NodeSession | None:
        """A bridge for the request, waiting up to ``grace`` seconds for one to connect."""
        session = self._pick(want)
        if session is not None:
            return session
        deadline = time.monotonic() + self.config.grace
        self.waiting += 1
        try:
            async with self._changed:
                while (session := self._pick(want)) is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.draining:
                        return None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
                return session
        finally:
            self.waiting -= 1

    async def close_sessions(self) -> None:
        for session in list(self.sessions):
            session.tunnel.conn.send_goaway(p.ErrorCode.GOING_AWAY, "relay shutting down")
            session.tunnel.flush()

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and wait (up to ``timeout``) for those in flight."""
        self.draining = True
        await self._notify()
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), deadline - time.monotonic())
        await self.close_sessions()

    # =================================================================================== HTTP
    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/_relay/") or path == "/_relay":
            await self._own(scope, receive, send, path)
            return
        auth = self._authenticate(scope)
        if auth is None:
            await self._deny(scope, send)
            return
        resolved = self._resolve(scope)
        if resolved is None:
            await _json_response(send, 404, {"error": "unknown route"})
            return
        route, target, prefix = resolved
        await self._proxy(scope, receive, send, route, target, prefix, auth)

    def _resolve(self, scope: Scope) -> tuple[str, str, str] | None:
        """``(route, target, prefix)`` of a request (see docs/protocol.md, addressing), or None for
        a malformed route name."""
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        port_route = self.config.route_ports.get(_server_port(scope))
        prefix = ""
        if port_route is not None:
            route, rest = port_route, raw_path
        elif raw_path.startswith(b"/r/"):
            name, _, rest_ = raw_path[3:].partition(b"/")
            route, rest = name.decode("latin-1"), b"/" + rest_
            prefix = f"/r/{route}"
            if not route or unquote(route) != route or route in (".", ".."):
                return None
        else:
            route, rest = self.config.default_route, raw_path
        target = rest.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        return route, target, prefix

    def _authenticate(self, scope: Scope) -> tuple[str, str] | None:
        """``(how, key id)`` for an authenticated request, else None.

        A client key that is presented and wrong counts as a failure of the client's address; an
        address with too many failures has its keys refused unchecked (``scope["bridge.retry"]``
        says for how long), so guessing gains nothing. Signed cookies cannot be guessed: they are
        checked whatever the count."""
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        cookie = _cookie(headers, COOKIE_NAME)
        if cookie:
            key_id = self.cookies.verify(cookie)
            if key_id is not None and self.keys.has_id(key_id):
                return self._within_rate(scope, ("cookie", key_id))
        presented: list[tuple[str, str]] = []
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                presented.append(("bearer", value[7:].decode("latin-1").strip()))
            elif name == b"x-bridge-key":
                presented.append(("header", value.decode("latin-1").strip()))
        presented = [(how, key) for how, key in presented if key]
        if not presented:
            return None
        client = _limit_key(scope)
        retry = self.failures.retry_after(client)
        if retry:
            scope["bridge.retry"] = retry
            return None
        for how, key in presented:
            key_id = self.keys.check(key)
            if key_id is not None:
                return self._within_rate(scope, (how, key_id))
        self.failures.failed(client)
        log.info("wrong client key from %s", client)
        return None

    def _within_rate(self, scope: Scope, auth: tuple[str, str]) -> tuple[str, str] | None:
        """``auth`` if its key is within ``--key-rate``, else None with ``scope["bridge.retry"]``
        and ``scope["bridge.why"]`` set (the caller answers 429)."""
        rate = self.config.key_rate
        if rate <= 0:
            return auth
        bucket = self._key_buckets.get(auth[1])
        if bucket is None:
            burst = self.config.key_burst or max(1, int(rate * 10))
            bucket = self._key_buckets[auth[1]] = RateLimiter(rate, burst)
        if bucket.allow():
            return auth
        scope["bridge.retry"] = max(1, math.ceil(1 / rate))
        scope["bridge.why"] = "rate limit of this client key exceeded; slow down"
        return None

    async def _deny(self, scope: Scope, send: Send) -> None:
        retry = scope.get("bridge.retry")
        if retry:
            await _json_response(send, 429, _refusal(scope), extra=[(b"retry-after", str(retry).encode())])
            return
        accept = header(_decode(scope["headers"]), "accept") or ""
        if scope["method"] == "GET" and "text/html" in accept:
            target = scope.get("raw_path", b"/").decode("latin-1")
            if scope.get("query_string"):
                target += "?" + scope["query_string"].decode("latin-1")
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        (b"location", b"/_relay/login?next=" + quote(target, safe="").encode()),
                        (b"cache-control", b"no-store"),
                        (b"content-length", b"0"),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
            return
        await _json_response(
            send,
            401,
            {
                "error": "a valid client key is required: "
                "Authorization: Bearer <key>, X-Bridge-Key, or log in at /_relay/login"
            },
            extra=[(b"www-authenticate", b'Bearer realm="bridge"')],
        )

    def _forward_headers(self, scope: Scope, auth: tuple[str, str], prefix: str) -> list[tuple[str, str]]:
        headers = strip_hop_by_hop(_decode(scope["headers"]))
        out: list[tuple[str, str]] = []
        host = ""
        for name, value in headers:
            lname = name.lower()
            if lname in FORWARDED or lname == "x-bridge-key":
                continue
            if lname == "authorization" and auth[0] == "bearer":
                continue  # the relay's own key, not the upstream's
            if lname == "cookie":
                value = _strip_cookie(_strip_cookie(value, COOKIE_NAME), NODE_COOKIE)
                if not value:
                    continue
            if lname == "host":
                host = value
            out.append((name, value))
        client = scope.get("client")
        out.append(("x-forwarded-for", client[0] if client else ""))
        out.append(("x-forwarded-proto", "https" if scope.get("scheme") in ("https", "wss") else "http"))
        if host:
            out.append(("x-forwarded-host", host))
        if prefix:
            out.append(("x-forwarded-prefix", prefix))
        return out

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        route: str,
        target: str,
        prefix: str,
        auth: tuple[str, str],
    ) -> None:
        method: str = scope["method"]
        if not p.valid_method(method) or not target.startswith("/"):
            await _json_response(send, 400, {"error": "invalid method or request target"})
            return
        if self.draining:
            await send_answer(send, RELAY_DRAINING)
            return
        headers = self._forward_headers(scope, auth, prefix)
        chunked = header(_decode(scope["headers"]), "transfer-encoding") is not None
        if chunked:  # the body is framed by chunks: a Content-Length beside them is a smuggling attempt
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        length = header(headers, "content-length")
        if length is not None and (not length.isdigit()):
            await _json_response(send, 400, {"error": "invalid Content-Length"})
            return
        if self.config.max_body and length is not None and int(length) > self.config.max_body:
            await _json_response(send, 413, {"error": f"body exceeds {self.config.max_body} bytes"})
            return
        has_body = chunked or (length is not None and int(length) > 0)
        # A small body is read before a node is chosen: it names the model, it can be sent again to
        # another node (retry once), and it identifies a repeated request. Larger ones stream.
        body: bytes | None = b""
        if has_body:
            body = None
            if not chunked and length is not None and int(length) <= BUFFER_LIMIT:
                try:
                    body = await _read_body(receive, self.config.body_timeout)
                except TimeoutError:
                    await _json_response(send, 408, {"error": BODY_STALLED})
                    return
                if body is None:
                    return  # the client went away
        sticky = _sticky(scope, auth)
        want = Want(route, _model_of(body), sticky)
        client = scope["client"][0] if scope.get("client") else ""
        request = _Request(method, route, target, headers, body, client)
        identity = self._identity(auth, request)
        if identity is not None:
            await self._shared_request(send, receive, identity, request, want)
            return
        status = 0
        started = time.perf_counter()
        self.in_flight += 1
        self.m_in_flight.inc()
        stream: Stream | None = None
        pump: asyncio.Task[None] | None = None
        try:
            for attempt in (1, 2):
                session = await self._acquire(want)
                refusal = NO_BRIDGE if session is None else self._refusal(session, route)
                if refusal is not None:
                    status = refusal.status
                    await send_answer(send, refusal)
                    return
                assert session is not None
                try:
                    stream = self._open(session, request, end_stream=not has_body)
                except HeadersTooLarge:
                    status = 431
                    await send_answer(send, HEAD_TOO_LARGE)
                    return
                pump = asyncio.create_task(self._pump_request(receive, stream, has_body, body))
                try:
                    head = await stream.head
                    break
                except StreamError as exc:
                    pump.cancel()
                    if exc.reason == BODY_STALLED:
                        status = 408
                        await _json_response(send, 408, {"error": BODY_STALLED})
                        return
                    if attempt == 1 and body is not None and exc.code in RETRY_CODES:
                        log.info(
                            "node %s lost %s %s before answering: retrying once", session.node, method, route
                        )
                        self.m_retries.inc()
                        stream.tunnel.forget(stream)
                        want = dataclasses.replace(want, exclude=want.exclude | {session}, sticky=None)
                        continue
                    log.info("stream of %s %s failed before its answer: %s", method, route, exc)
                    answer = stream_failed(exc.code, route)
                    status = answer.status
                    await send_answer(send, answer)
                    return
            assert stream is not None and session is not None
            passed = _response_headers(head.status, head.headers)
            if passed is None:
                status = 502
                log.warning("node %s sent an invalid response head (status %s)", session.node, head.status)
                stream.reset(p.ErrorCode.PROTOCOL_ERROR, "invalid response head")
                await send_answer(send, INVALID_HEAD)
                return
            status = head.status
            out_headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in passed]
            out_headers.append((b"x-bridge-node", session.node.encode("latin-1", "replace")))
            if auth[0] == "cookie" and sticky != session.node:
                out_headers.append((b"set-cookie", _node_cookie(session.node)))
            await send({"type": "http.response.start", "status": status, "headers": out_headers})
            if status in (204, 304) or method == "HEAD":
                # No body may follow: the response is complete now, whatever the stream does next
                # (ending it later would drop a keep-alive connection the client already reuses).
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                with contextlib.suppress(StreamError, TimeoutError):
                    async with asyncio.timeout(1.0):
                        while await stream.read():
                            pass
                return
            first = True
            # With a Content-Length, the client sees a complete body once that many bytes came:
            # the response is then finished whatever the stream does, and never sent more.
            declared = header(passed, "content-length")
            left = int(declared) if declared is not None else None
            while True:
                try:
                    chunk = await stream.read()
                except StreamError as exc:
                    if left == 0:
                        break
                    log.warning("stream %d (%s %s) cut mid-response: %s", stream.id, method, route, exc)
                    status = 599  # recorded as an aborted response; the client sees a broken body
                    return  # returning without finishing: the server drops the client connection
                if first:
                    self.m_ttfb.observe(time.perf_counter() - started)
                    first = False
                if not chunk:
                    if left:
                        log.warning("stream %d (%s %s) ended %d bytes short", stream.id, method, route, left)
                        status = 599
                        return
                    break
                if left is not None:
                    chunk = chunk[:left]
                    left -= len(chunk)
                    if not chunk:
                        continue
                self.m_bytes.labels("response").inc(len(chunk))
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if pump is not None:
                pump.cancel()
            if stream is not None and not stream.done:
                if stream.id in stream.tunnel.conn.streams:
                    stream.reset(p.ErrorCode.CANCEL, "client went away")
                stream.tunnel.forget(stream)
            self.in_flight -= 1
            self.m_in_flight.dec()
            if status:
                self.m_requests.labels(route, str(status)).inc()
            if not self.in_flight:
                await self._notify()

    @staticmethod
    def _refusal(session: NodeSession, route: str) -> Answer | None:
        """Why ``session`` cannot take a request for ``route`` (a bridge that announced its routes
        and not this one), or None."""
        if session.routes and route not in session.routes:
            return unknown_route(route)
        return None

    def _open(self, session: NodeSession, request: _Request, *, end_stream: bool) -> Stream:
        """OPEN a stream for ``request`` on ``session``. Raises HeadersTooLarge for an oversized head."""
        conn = session.tunnel.conn
        sid = conn.next_stream_id()
        conn.open_stream(
            sid,
            request.method,
            request.route,
            request.target,
            request.headers,
            end_stream=end_stream,
            client=request.client,
        )
        stream = session.tunnel.add_stream(sid)
        session.tunnel.flush()
        return stream

    async def _pump_request(
        self, receive: Receive, stream: Stream, has_body: bool, body: bytes | None = None
    ) -> None:
        """Send the request body as credit allows (``body`` when it was read already, else from the
        client, at most max_body bytes, chunked or not), then watch for the client going away."""
        total = 0
        try:
            if has_body and body is not None:
                self.m_bytes.labels("request").inc(len(body))
                await stream.write(body, end=True)
            elif has_body:
                idle = self.config.body_timeout or None
                while True:
                    try:
                        message = await asyncio.wait_for(receive(), idle)
                    except TimeoutError:
                        stream.reset(p.ErrorCode.CANCEL, BODY_STALLED)
                        return
                    if message["type"] == "http.disconnect":
                        stream.reset(p.ErrorCode.CANCEL, "client went away")
                        return
                    chunk = message.get("body", b"")
                    more = message.get("more_body", False)
                    self.m_bytes.labels("request").inc(len(chunk))
                    total += len(chunk)
                    if self.config.max_body and total > self.config.max_body:
                        stream.reset(p.ErrorCode.BODY_TOO_LARGE, f"body exceeds {self.config.max_body} bytes")
                        return
                    await stream.write(chunk, end=not more)
                    if not more:
                        break
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    stream.reset(p.ErrorCode.CANCEL, "client went away")
                    return
        except StreamError:
            return

    # =================================================================================== shared answers
    def _identity(self, auth: tuple[str, str], request: _Request) -> tuple[str, str] | None:
        """What makes a request the same as an earlier one of the same client key: its
        ``Idempotency-Key``, or the SHA-256 of a deterministic body (temperature 0). None: not shared."""
        if self.config.idempotency_ttl <= 0 or request.body is None:
            return None
        explicit = header(request.headers, "idempotency-key")
        if explicit:
            return auth[1], f"key:{request.route}:{explicit[:256]}"
        if request.method == "POST" and _deterministic(request.body):
            digest = hashlib.sha256(
                f"{request.method} {request.route} {request.target}\n".encode() + request.body
            ).hexdigest()
            return auth[1], f"sha256:{digest}"
        return None

    async def _shared_request(
        self, send: Send, receive: Receive, identity: tuple[str, str], request: _Request, want: Want
    ) -> None:
        entry = self.shared.get(identity)
        how = "joined" if entry is not None and not entry.done else "replayed"
        if entry is None:
            how = "new"
            entry = self.shared.put(identity)
            self.spawn(self._produce(entry, request, want))
        else:
            self.m_joined.inc()
            log.info("repeated %s %s %s: %s", request.method, request.route, request.target, how)
        await _serve_shared(entry, send, receive, how)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task that outlives the request that started it."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _produce(self, entry: Shared, request: _Request, want: Want) -> None:
        """Run ``request`` on a node into ``entry``, whoever reads it (retry once, as _proxy)."""
        self.in_flight += 1
        self.m_in_flight.inc()
        stream: Stream | None = None
        status = 0

        def refuse(answer: Answer) -> None:
            nonlocal status
            status = answer.status
            headers, body = answer.encode()
            entry.answer(answer.status, headers, body, str(answer.body.get("error", "")))

        try:
            for attempt in (1, 2):
                session = await self._acquire(want)
                refusal = NO_BRIDGE if session is None else self._refusal(session, request.route)
                if refusal is not None:
                    refuse(refusal)
                    return
                assert session is not None
                try:
                    stream = self._open(session, request, end_stream=not request.body)
                    if request.body:
                        await stream.write(request.body, end=True)
                    head = await stream.head
                    break
                except StreamError as exc:
                    if attempt == 1 and exc.code in RETRY_CODES:
                        self.m_retries.inc()
                        if stream is not None:
                            stream.tunnel.forget(stream)
                        want = dataclasses.replace(want, exclude=want.exclude | {session}, sticky=None)
                        continue
                    log.info(
                        "stream of %s %s failed before its answer: %s", request.method, request.route, exc
                    )
                    refuse(stream_failed(exc.code, request.route))
                    return
                except HeadersTooLarge:
                    refuse(HEAD_TOO_LARGE)
                    return
            assert stream is not None and session is not None
            passed = _response_headers(head.status, head.headers)
            if passed is None:
                stream.reset(p.ErrorCode.PROTOCOL_ERROR, "invalid response head")
                refuse(INVALID_HEAD)
                return
            status = head.status
            entry.start(head.status, [*passed, ("x-bridge-node", session.node)])
            while chunk := await stream.read():
                self.m_bytes.labels("response").inc(len(chunk))
                entry.append(chunk)
            entry.finish()
        except StreamError as exc:
            status = 599
            entry.fail(f"cut mid-response: {exc.reason}")
        finally:
            if not entry.done:  # stopped (the relay shuts down) before the end
                if entry.started:
                    entry.fail("relay stopped")
                else:
                    refuse(RELAY_DRAINING)
            if stream is not None and not stream.done:
                if stream.id in stream.tunnel.conn.streams:
                    stream.reset(p.ErrorCode.CANCEL, "relay stopped")
                stream.tunnel.forget(stream)
            self.in_flight -= 1
            self.m_in_flight.dec()
            if status:
                self.m_requests.labels(request.route, str(status)).inc()
            if not self.in_flight:
                await self._notify()

    # =================================================================================== client WebSockets
    async def _client_ws(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A client WebSocket (e.g. Open WebUI's socket.io), carried as a stream whose DATA holds
        WebSocket records (docs/protocol.md, client WebSockets). Same auth and routing as HTTP."""
        if (await receive())["type"] != "websocket.connect":
            return
        if scope["path"].startswith("/_relay/"):
            await _ws_deny(scope, send, 404, {"error": "not found"})
            return
        auth = self._authenticate(scope)
        if auth is None:
            retry = scope.get("bridge.retry")
            if retry:
                await _ws_deny(scope, send, 429, _refusal(scope), [("retry-after", str(retry))])
            else:
                await _ws_deny(scope, send, 401, {"error": "a valid client key or login cookie is required"})
            return
        resolved = self._resolve(scope)
        if resolved is None:
            await _ws_deny(scope, send, 404, {"error": "unknown route"})
            return
        route, target, prefix = resolved
        if self.draining:
            await _ws_deny(scope, send, 503, {"error": "relay is shutting down"})
            return
        headers = [
            (k, v) for k, v in self._forward_headers(scope, auth, prefix) if k.lower() not in _WS_OWN_HEADERS
        ]
        self.websockets += 1
        stream: Stream | None = None
        try:
            sticky = _sticky(scope, auth)
            session = await self._acquire(Want(route, None, sticky))
            if session is None:
                await _ws_deny(scope, send, 503, {"error": "no bridge is connected; try again shortly"})
                return
            conn = session.tunnel.conn
            sid = conn.next_stream_id()
            try:
                conn.open_stream(
                    sid,
                    "GET",
                    route,
                    target,
                    headers,
                    client=scope["client"][0] if scope.get("client") else "",
                    websocket=True,
                )
            except HeadersTooLarge:
                await _ws_deny(scope, send, 431, {"error": "request header fields too large"})
                return
            stream = session.tunnel.add_stream(sid)
            session.tunnel.flush()
            try:
                head = await stream.head
            except StreamError as exc:
                answer = stream_failed(exc.code, route)
                await _ws_deny(scope, send, answer.status, answer.body, list(answer.headers))
                return
            if head.status != 101:
                body = b""
                with contextlib.suppress(StreamError):
                    while len(body) < 65536 and (chunk := await stream.read()):
                        body += chunk
                await _ws_deny(scope, send, head.status, body, head.headers)
                return
            await send(
                {
                    "type": "websocket.accept",
                    "subprotocol": header(head.headers, "sec-websocket-protocol"),
                }
            )
            await _splice_ws(receive, send, stream)
        finally:
            self.websockets -= 1
            if stream is not None and not stream.done:
                if stream.id in stream.tunnel.conn.streams:
                    stream.reset(p.ErrorCode.CANCEL, "client went away")
                stream.tunnel.forget(stream)

    # =================================================================================== /_relay/
    async def _own(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        method = scope["method"]
        if path == "/_relay/health":
            await _json_response(send, 200, self.health())
        elif path == "/_relay/login":
            await self._login(scope, receive, send)
        elif path == "/_relay/jobs" or path.startswith("/_relay/jobs/"):
            auth = self._authenticate(scope)
            if auth is None:
                await self._deny(scope, send)
            else:
                await self.jobs.handle(scope, receive, send, auth[1], path)
        elif path == "/_relay/logout":
            await send(
                {
                    "type": "http.response.start",
                    "status": 303,
                    "headers": [
                        (b"location", b"/_relay/login"),
                        (b"content-length", b"0"),
                        (
                            b"set-cookie",
                            f"{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax".encode(),
                        ),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": b""})
        elif path in ("/_relay/", "/_relay", "/_relay/status", "/_relay/metrics"):
            if self._authenticate(scope) is None:
                await self._deny(scope, send)
            elif path in ("/_relay/", "/_relay"):
                await _html_response(send, 200, status_page(self.status()))
            elif path == "/_relay/status":
                await _json_response(send, 200, self.status())
            else:
                body = prom.generate_latest(self.registry)
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", prom.CONTENT_TYPE_LATEST.encode()),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
        else:
            await _json_response(send, 404 if method in ("GET", "HEAD") else 405, {"error": "not found"})

    def health(self) -> dict[str, Any]:
        """No secrets: whether a node is connected, since when, when the last one left, load."""
        connected = self.store.last_node_event("connected")
        left = self.store.last_node_event("disconnected")
        live = [s for s in self.sessions if not s.tunnel.closed and not s.draining]
        return {
            "status": "ok" if live else "no_node",
            "node_connected": bool(live),
            "nodes": len(live),
            "connected_since": _iso(min(s.connected_at for s in live)) if live else None,
            "last_connected_at": _iso(connected[0]) if connected else None,
            "last_disconnected_at": _iso(left[0]) if left else None,
            "requests_in_flight": self.in_flight,
            "requests_waiting": self.waiting,
            "websockets_open": self.websockets,
            "draining": self.draining,
            "version": __version__,
            "protocol": p.PROTOCOL_VERSION,
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.health(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "default_route": self.config.default_route,
            "route_ports": {str(k): v for k, v in self.config.route_ports.items()},
            "nodes_detail": [
                {
                    "node": s.node,
                    "session": s.session,
                    "routes": sorted(s.routes),
                    "connected_since": _iso(s.connected_at),
                    "streams": s.load,
                    "models": sorted(s.models),
                    "draining": s.draining,
                    "info": s.info,
                    **self.stats.latest.get(s.node, {}),
                }
                for s in self.sessions
            ],
        }

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        next_url = _safe_next(query.get("next", ["/"])[0])
        if scope["method"] == "GET":
            await _html_response(send, 200, login_page(next_url, ""))
            return
        if scope["method"] != "POST":
            await _json_response(send, 405, {"error": "use GET or POST"})
            return
        client = _limit_key(scope)
        retry = self.failures.retry_after(client)
        if retry:
            await _json_response(
                send,
                429,
                {"error": "too many failed attempts; wait a minute"},
                extra=[(b"retry-after", str(retry).encode())],
            )
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > 8192:
                await _json_response(send, 413, {"error": "login form too large"})
                return
            if not message.get("more_body"):
                break
        form = parse_qs(body.decode("utf-8", "replace"))
        key = form.get("key", [""])[0].strip()
        next_url = _safe_next(form.get("next", [next_url])[0])
        key_id = self.keys.check(key)
        if key_id is None:
            self.failures.failed(client)
            log.warning("failed login from %s", client)
            await _html_response(send, 401, login_page(next_url, "That key is not valid."))
            return
        secure = (
            "; Secure"
            if scope.get("scheme") == "https"
            or header(_decode(scope["headers"]), "x-forwarded-proto") == "https"
            else ""
        )
        cookie = (
            f"{COOKIE_NAME}={self.cookies.issue(key_id)}; Path=/; Max-Age={self.cookies.max_age}; "
            f"HttpOnly; SameSite=Lax{secure}"
        )
        await send(
            {
                "type": "http.response.start",
                "status": 303,
                "headers": [
                    (b"location", next_url.encode("latin-1")),
                    (b"set-cookie", cookie.encode()),
                    (b"cache-control", b"no-store"),
                    (b"content-length", b"0"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})


# ======================================================================================= helpers
#: Headers of the client's WebSocket handshake that the bridge's own handshake replaces.
_WS_OWN_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-accept"}
)


async def _ws_deny(
    scope: Scope, send: Send, status: int, body: Any, headers: p.Headers | None = None
) -> None:
    """Refuse a WebSocket handshake with an HTTP response (or close 1008 where the server cannot)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    if isinstance(body, bytes):
        data = body
        out = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in strip_hop_by_hop(headers or [])
            if k.lower() not in ("content-length", *_WS_OWN_HEADERS)
        ]
    else:
        data = json.dumps(body).encode()
        out = [(b"content-type", b"application/json")]
        out += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers or []]
    out.append((b"content-length", str(len(data)).encode()))
    await send({"type": "websocket.http.response.start", "status": status, "headers": out})
    await send({"type": "websocket.http.response.body", "body": data})


async def _splice_ws(receive: Receive, send: Send, stream: Stream) -> None:
    """Carry messages both ways between the client's WebSocket (ASGI) and the stream's records."""

    async def up() -> None:  # client -> bridge
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                code = int(message.get("code", 1005))
                await stream.write(p.encode_ws_close(code, message.get("reason") or ""), end=True)
                return
            if message.get("text") is not None:
                await stream.write(p.encode_ws_record(p.WS_TEXT, message["text"].encode()))
            else:
                await stream.write(p.encode_ws_record(p.WS_BINARY, message.get("bytes") or b""))

    async def down() -> None:  # bridge -> client
        reader = p.WsRecordReader()
        while chunk := await stream.read():
            for opcode, payload in reader.feed(chunk):
                if opcode == p.WS_TEXT:
                    await send({"type": "websocket.send", "text": payload.decode("utf-8", "replace")})
                elif opcode == p.WS_BINARY:
                    await send({"type": "websocket.send", "bytes": payload})
                else:
                    code, reason = p.decode_ws_close(payload)
                    await send({"type": "websocket.close", "code": _sendable_close(code), "reason": reason})
                    return
        await send({"type": "websocket.close", "code": 1011, "reason": "upstream ended without closing"})

    tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, StreamError):
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": 1011, "reason": "tunnel stream failed"})
            elif isinstance(exc, ProtocolError):
                stream.reset(exc.code, str(exc))
                with contextlib.suppress(Exception):
                    await send({"type": "websocket.close", "code": 1002, "reason": "bad message from bridge"})
            elif exc is not None and not isinstance(exc, OSError):
                raise exc
        if tasks[1] in done and not tasks[0].done():
            # The upstream closed: give the client's close frame a moment to come back, then stop.
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(tasks[0], 5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _read_body(receive: Receive, idle: float = 0.0) -> bytes | None:
    """The whole request body, or None when the client went away. Raises TimeoutError when no
    part of it came for ``idle`` seconds (0: wait for ever)."""
    parts: list[bytes] = []
    while True:
        message = await asyncio.wait_for(receive(), idle or None)
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


#: A header name (RFC 9110 token).
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: What a header value may not hold: control characters other than tab, or anything past Latin-1.
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]|[^\x00-\xff]")
#: Response headers a bridge may not set: the relay's own (node name, its session cookie).
_OWN_RESPONSE_HEADERS = frozenset({"x-bridge-node", "x-bridge-idempotent"})


def _response_headers(status: int, headers: p.Headers) -> list[tuple[str, str]] | None:
    """The headers of a bridge's answer to an HTTP request as the relay passes them on, or None when
    the head cannot be passed on: a 1xx status (an interim or protocol switch the client did not ask
    for) or one outside 200-599. Hop-by-hop headers, header names that are not tokens, values with
    control characters or beyond Latin-1, the relay's own headers and a ``Set-Cookie`` of the relay's
    session cookie are dropped."""
    if not 200 <= status <= 599:
        return None
    out = []
    for name, value in strip_hop_by_hop(headers):
        lname = name.lower()
        if not _TOKEN.match(name) or lname in _OWN_RESPONSE_HEADERS:
            continue
        if lname == "set-cookie" and value.lstrip().startswith(f"{COOKIE_NAME}="):
            continue
        if _BAD_VALUE.search(value):
            continue
        out.append((name, value))
    # One Content-Length, made of digits, or none (the body is then sent chunked): never two that
    # disagree, which would desynchronise the client's connection. None on 204 and 304, which carry
    # no body whatever length they name (uvicorn would wait for one).
    lengths = {v.strip() for k, v in out if k.lower() == "content-length"}
    if lengths:
        out = [(k, v) for k, v in out if k.lower() != "content-length"]
        if len(lengths) == 1 and (length := lengths.pop()).isdigit() and status not in (204, 304):
            out.append(("content-length", length))
    return out


def _json_body(body: bytes | None) -> dict[str, Any] | None:
    if not body or body[:1] != b"{":
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _model_of(body: bytes | None) -> str | None:
    """The ``model`` an Ollama or OpenAI-style request names, if any."""
    value = _json_body(body)
    model = value.get("model") if value else None
    return model if isinstance(model, str) and model else None


def _deterministic(body: bytes) -> bool:
    """A generation whose answer does not depend on chance: temperature 0 (OpenAI's top-level
    ``temperature`` or Ollama's ``options.temperature``)."""
    value = _json_body(body)
    if value is None:
        return False
    options = value.get("options")
    temperature = value.get("temperature", options.get("temperature") if isinstance(options, dict) else None)
    return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


def _models(value: Any) -> frozenset[str]:
    if not isinstance(value, list):
        return frozenset()
    return frozenset(m[:128] for m in value[:256] if isinstance(m, str) and m)


def _serves(models: frozenset[str], model: str) -> bool:
    """Whether a node serving ``models`` serves ``model`` (Ollama's implicit ``:latest`` tag)."""
    if model in models:
        return True
    base, _, tag = model.partition(":")
    return (not tag and f"{base}:latest" in models) or (tag == "latest" and base in models)


def _sticky(scope: Scope, auth: tuple[str, str]) -> str | None:
    """The node a browser (cookie login) was served by before, if it says."""
    value = _cookie(scope["headers"], NODE_COOKIE) if auth[0] == "cookie" else None
    return unquote(value) if value else None


def _node_cookie(node: str) -> bytes:
    return f"{NODE_COOKIE}={quote(node, safe='')}; Path=/; HttpOnly; SameSite=Lax".encode()


async def _serve_shared(entry: Shared, send: Send, receive: Receive, how: str) -> None:
    """Answer one client from a shared response, from its first byte, following it live."""
    status, headers = await entry.head()
    out = [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers]
    out.append((b"x-bridge-idempotent", how.encode()))

    async def copy() -> None:
        await send({"type": "http.response.start", "status": status, "headers": out})
        with contextlib.suppress(ConnectionError, SharedOverflow):
            async for chunk in entry.body():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    tasks = [asyncio.create_task(copy()), asyncio.create_task(watch())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sendable_close(code: int) -> int:
    """A close code an endpoint may send: 1005 (no status) becomes 1000, 1006 (abnormal) 1011."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code < 5000:
        return code
    return 1011 if code in (1006, 1015) else 1000


def _decode(headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]


def _cookie(headers: list[tuple[bytes, bytes]], name: str) -> str | None:
    prefix = name.encode() + b"="
    for key, value in headers:
        if key == b"cookie":
            for part in value.split(b";"):
                part = part.strip()
                if part.startswith(prefix):
                    return part[len(prefix) :].decode("latin-1")
    return None


def _strip_cookie(value: str, name: str) -> str:
    return "; ".join(
        part.strip() for part in value.split(";") if part.strip() and not part.strip().startswith(name + "=")
    )


def _client_addr(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}" if client else "unknown"


def _refusal(scope: Scope) -> dict[str, str]:
    """The body of a 429 that :meth:`Relay._authenticate` asked for (``scope["bridge.retry"]``):
    the key's rate limit, or too many failures from the address."""
    return {"error": scope.get("bridge.why", "too many failed attempts from this address; wait a minute")}


def _limit_key(scope: Scope) -> str:
    """The address failed authentications are counted against: the client's, or, behind a proxy
    on the same machine (Caddy, nginx: the peer is a loopback address), the address that proxy
    appended to ``X-Forwarded-For``, so that one client guessing keys does not lock out everyone
    who comes through the proxy. A peer elsewhere cannot choose its key this way."""
    peer = _client_addr(scope)
    if is_loopback(peer):
        forwarded = header(_decode(scope["headers"]), "x-forwarded-for")
        if forwarded and forwarded.split(",")[-1].strip():
            return forwarded.split(",")[-1].strip()
    return peer


def _server_port(scope: Scope) -> int:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else 0


def _safe_next(value: str) -> str:
    """Only same-site relative paths: no open redirect."""
    if not value.startswith("/") or value.startswith("//") or "\\" in value or "\r" in value or "\n" in value:
        return "/"
    return value


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


async def _json_response(
    send: Send, status: int, body: dict[str, Any], extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _html_response(send: Send, status: int, page: str) -> None:
    data = page.encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(data)).encode()),
                (b"cache-control", b"no-store"),
                (b"x-frame-options", b"DENY"),
                (
                    b"content-security-policy",
                    b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
                ),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data})


# ======================================================================================= serving
#: Seconds a client has to send a whole request head; then 408 and the connection closes (a
#: slowloris client, or a socket opened and left idle, holds nothing for longer).
HEAD_TIMEOUT = 10.0
#: The largest request head (request line and headers) read: a larger one gets 431 and is never
#: buffered in full. The same bound as the tunnel's header block.
MAX_HEAD_BYTES = p.MAX_HEADER_BLOCK

_RESPONSE_408 = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_RESPONSE_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b'content-length: 45\r\nconnection: close\r\n\r\n{"error": "request header fields too large"}\n'
)


def _guarded_protocol() -> Any:
    """uvicorn's httptools protocol with the two bounds it lacks (HEAD_TIMEOUT, MAX_HEAD_BYTES)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # no httptools: uvicorn's h11 protocol limits the head size itself
        return "auto"

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

    return GuardedHttp


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
            "signal %s: draining %d request(s) in flight", signal.Signals(sig).name, self.relay.in_flight
        )
        loop = asyncio.get_event_loop()
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain_then_exit()))

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
    import socket

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
        ws_max_size=2 * p.MAX_MESSAGE,
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
