"""The bridge: the notebook side. It dials OUT to the relay over one WebSocket, says HELLO with the
node token and its routes, and forwards every stream the relay opens to the named upstream (never to
an address a client names), streaming both ways with flow control.

It reconnects with capped exponential backoff and full jitter, sends a heartbeat (text ``ping``) every
interval the relay asked for, and treats silence for three intervals as a dead link. On SIGINT/SIGTERM
it drains: GOAWAY to the relay (which then holds new requests for the next bridge), finishes the
streams in flight, then closes.

Every HTTP request it forwards is measured (bridge/metrics.py): one line per request in the JSONL log
under ``--metrics-dir``, one INFO log line per generation, and a STATS ``request`` frame to the relay,
which publishes it on ``/_relay/metrics``; GPU and host samples (bridge/sampler.py) go the same ways.

With ``--listen`` it also serves its routes on a local HTTP endpoint (``/r/<route>/...`` and the
default route at ``/``; its own Prometheus series at ``/_bridge/metrics``), so that programs next
to it (Open WebUI talking to the engine) go through the same forwarding, metering and load
balancing as tunnelled requests. A route may have several
upstreams (replicas): each request goes to the one with the fewest requests outstanding.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import random
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import prometheus_client as prom
import uvicorn
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol
from yarl import URL

from . import __version__
from . import wire as p
from ._config import BridgeConfig, Route
from ._http import failure_words, header, host_of, is_loopback, origin_of, strip_hop_by_hop
from ._stats import RelayStats
from .errors import AuthError, ConfigError, HeadersTooLarge, LocalProtocolError, ProtocolError, StreamError
from .metrics import MetricsLog, RateLimiter, RequestMeter, describe
from .tunnel.stream import Stream
from .tunnel.tunnel import Tunnel

log = logging.getLogger("bridge.node")

#: GOAWAY codes after which reconnecting cannot help.
FATAL_CODES = {p.ErrorCode.UNAUTHORIZED, p.ErrorCode.UNSUPPORTED_VERSION}


#: STATS ``request`` fields the relay publishes (docs/protocol.md §12a); the JSONL keeps more.
STATS_REQUEST_FIELDS = (
    "kind",
    "route",
    "model",
    "status",
    "queue_s",
    "ttft_s",
    "total_s",
    "tokens_per_s",
    "prompt_tokens",
    "prompt_tokens_per_s",
    "completion_tokens",
    "bytes_in",
    "bytes_out",
)
#: An upstream that refused a connection is tried after the others for this long.
UPSTREAM_COOLDOWN = 5.0
#: Seconds between asking the upstreams which models they serve (Ollama's ``/api/tags``, else the
#: OpenAI-style ``/v1/models``); the relay routes a request naming a model to a node that lists it.
MODELS_EVERY = 60.0


@dataclass(frozen=True, slots=True)
class BridgeOptions:
    """The bridge's settings beyond :class:`BridgeConfig`: metering and the local endpoint."""

    #: ``HOST:PORT`` of the local endpoint ("" = none; port 0 = any free port, logged).
    listen: str = ""
    #: Key the local endpoint requires (``Authorization: Bearer`` or ``X-Bridge-Key``); required
    #: when ``listen`` is not a loopback address.
    listen_key: str = ""
    #: Route served at ``/`` of the local endpoint ("" = the first route).
    default_route: str = ""
    #: Directory of the JSONL log (None = no log file).
    metrics_dir: Path | None = None
    #: Seconds between GPU/host samples (0 = no sampling).
    sample_interval: float = 5.0
    #: Told to the relay as a node fact (``split``, ``replicas``, ...).
    gpu_mode: str = ""
    #: Most STATS ``request`` frames a second (bursts of 10x); the JSONL log keeps every record.
    stats_rate: float = 20.0


def parse_routes_multi(items: Iterable[str]) -> tuple[Route, ...]:
    """``NAME=URL[,URL...]`` items (space or comma separated, repeatable) into routes; a name may
    come back with several URLs (replicas), e.g. ``ollama=http://127.0.0.1:11434,http://127.0.0.1:11435``.
    A piece without ``=`` is one more upstream of the route before it."""
    routes: list[Route] = []
    for item in items:
        for piece in item.replace(",", " ").split():
            if "=" not in piece:
                if not routes:
                    raise ConfigError(f"route {piece!r}: expected NAME=URL")
                piece = f"{routes[-1].name}={piece}"
            route = Route.parse(piece)
            if any(r.name == route.name and r.url == route.url for r in routes):
                raise ConfigError(f"route {route.name}: {route.url} given twice")
            routes.append(route)
    return tuple(routes)


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into its parts."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT")
    return host, int(port)


class Upstream:
    """One URL of a route, with the number of requests it is serving now."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outstanding = 0
        self.failed_at = 0.0  # monotonic time of the last connection failure (0: none)


class RoutePool:
    """A route's upstreams: least outstanding requests first, ties taken in turn (round-robin),
    those that recently refused a connection last."""

    def __init__(self, name: str, urls: list[str]) -> None:
        self.name = name
        self.upstreams = [Upstream(u) for u in urls]
        self._next = 0

    def candidates(self) -> list[Upstream]:
        n = len(self.upstreams)
        now = time.monotonic()
        order = sorted(
            range(n),
            key=lambda i: (
                now - self.upstreams[i].failed_at < UPSTREAM_COOLDOWN,
                self.upstreams[i].outstanding,
                (i - self._next) % n,
            ),
        )
        return [self.upstreams[i] for i in order]

    def picked(self, upstream: Upstream) -> None:
        self._next = (self.upstreams.index(upstream) + 1) % len(self.upstreams)


class Downstream(Protocol):
    """Where a forwarded response goes: the tunnel stream, or a local HTTP client."""

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def end(self) -> None: ...
    async def fail(self, code: int, reason: str) -> None: ...


class _TunnelDownstream:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        stream = self.stream
        if stream.done:
            raise stream.error or StreamError(p.ErrorCode.CANCEL, "stream gone")
        try:
            stream.tunnel.conn.send_response(stream.id, status, headers)
        except HeadersTooLarge:
            stream.reset(p.ErrorCode.UPSTREAM_ERROR, "response head too large")
            raise StreamError(p.ErrorCode.UPSTREAM_ERROR, "response head too large") from None
        stream.tunnel.flush()

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def end(self) -> None:
        stream = self.stream
        await stream.write(b"", end=True)
        if stream.id in stream.tunnel.conn.streams:  # upstream answered before reading the whole body
            stream.reset(p.ErrorCode.NO_ERROR, "response complete")
        else:
            stream.tunnel.forget(stream)

    async def fail(self, code: int, reason: str) -> None:
        self.stream.reset(code, reason)


class _MeteredBody:
    """The request body on its way to the upstream: counts bytes, and remembers whether any byte
    was read (after which the request cannot be retried on another upstream)."""

    def __init__(self, body: AsyncIterator[bytes], meter: RequestMeter) -> None:
        self._body = body
        self._meter = meter
        self.started = False
        #: The client went away while its body was being sent (aiohttp reports it wrapped).
        self.client_gone = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        self.started = True
        try:
            async for chunk in self._body:
                self._meter.request_bytes(len(chunk))
                yield chunk
        except StreamError:
            self.client_gone = True
            raise


class Bridge:
    """Run with :meth:`run`; stop with :meth:`stop` (graceful) or by cancelling."""

    def __init__(self, config: BridgeConfig, options: BridgeOptions | None = None) -> None:
        self.config = config
        self.options = options or BridgeOptions()
        #: Route name -> its first upstream (HELLO lists the names); ``pools`` has them all.
        self.routes: dict[str, Route] = {}
        urls: dict[str, list[str]] = {}
        for r in config.routes:
            self.routes.setdefault(r.name, r)
            urls.setdefault(r.name, []).append(r.url)
        self.pools: dict[str, RoutePool] = {name: RoutePool(name, u) for name, u in urls.items()}
        default = self.options.default_route or (config.routes[0].name if config.routes else "")
        if self.options.default_route and default not in self.routes:
            raise ConfigError(f"default route {default!r} is not one of the routes")
        self.default_route = default
        self.metrics = MetricsLog(self.options.metrics_dir)
        #: The same Prometheus series the relay publishes, for this bridge alone (local endpoint,
        #: ``/_bridge/metrics``): there even when the relay is out of reach.
        self.registry = prom.CollectorRegistry()
        self.prom = RelayStats(self.registry)
        self._stats_limit = RateLimiter(self.options.stats_rate, max(1, int(self.options.stats_rate * 10)))
        self._facts: dict[str, Any] = {}
        self.last_sample: dict[str, Any] | None = None
        self.local_port: int | None = None
        self.local_ready = asyncio.Event()
        self.node = config.node_name or socket.gethostname()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.tunnel: Tunnel | None = None
        self.connected = asyncio.Event()
        self.sessions = 0
        #: Models the upstreams serve, sent in HELLO and in a STATS ``node`` body when they change.
        self.models: list[str] = []
        #: The shortest interval between STATS samples the relay asked for (WELCOME ``stats_interval``).
        self._stats_every = 0.0
        self._stats_sent_at = 0.0
        self._upstream: aiohttp.ClientSession | None = None

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Connect, serve, reconnect, until :meth:`stop`. Raises AuthError on a refused token."""
        attempt = 0
        background: list[asyncio.Task[None]] = []
        server: _LocalServer | None = None
        try:
            if self.options.listen:
                server = await self._start_local()
                background.append(asyncio.create_task(server.serve_forever(), name="bridge-local"))
            if self.options.sample_interval > 0:
                background.append(asyncio.create_task(self._sample_loop(), name="bridge-sampler"))
            background.append(asyncio.create_task(self._models_loop(), name="bridge-models"))
            while not self._stopping.is_set():
                try:
                    served = await self._session()
                except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                    log.warning("relay unreachable: %s", _describe(exc))
                    served = False
                if self._stopping.is_set():
                    break
                attempt = 0 if served else attempt + 1
                delay = random.uniform(
                    0, min(self.config.backoff_max, self.config.backoff_initial * 2 ** min(attempt, 16))
                )
                log.info("reconnecting in %.1f s", delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
        finally:
            if server is not None:
                server.should_exit = True  # finishes local requests in flight (up to the drain timeout)
                with contextlib.suppress(Exception, asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(asyncio.shield(background[0]), self.config.drain_timeout + 1)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if self._upstream is not None:
                await self._upstream.close()
            self.metrics.close()

    def stop(self) -> None:
        """Begin a graceful stop: drain streams in flight, then return from :meth:`run`."""
        self._stopping.set()

    async def _session(self) -> bool:
        """One WebSocket session. True if it was established (so backoff starts over)."""
        cfg = self.config
        async with websockets.connect(
            cfg.connect_url,
            open_timeout=cfg.connect_timeout,
            ping_interval=None,
            max_size=2 * p.MAX_MESSAGE,
            compression=None,
            close_timeout=5,
            user_agent_header=f"kaggle-bridge/{__version__}",
        ) as ws:
            conn = p.Connection(
                p.Role.BRIDGE, window=cfg.window, max_frame=cfg.max_frame, max_streams=cfg.max_streams
            )
            tunnel = Tunnel(conn, ws.send, ws.send, on_open=self._on_open)
            try:
                extra: dict[str, Any] = {"models": self.models} if self.models else {}
                conn.send_hello(
                    cfg.node_token, self.node, self.routes, software=f"kaggle-bridge/{__version__}", **extra
                )
                await tunnel.send_now()
                welcome = await self._await_welcome(ws, tunnel)
                tunnel.coalesce = _hint(welcome.info.get("coalesce"), 1.0)
                self._stats_every = _hint(welcome.info.get("stats_interval"), 3600.0)
                self.tunnel = tunnel
                self.sessions += 1
                self.connected.set()
                self._send_stats(self._node_facts())
                if self.last_sample is not None:
                    self._send_stats(self.last_sample)
                log.debug("relay: %s", cfg.relay)  # the URL itself only at debug: Kaggle saves the logs
                log.info(
                    "connected to the relay as %s (session %s), routes %s",
                    self.node,
                    welcome.session,
                    ",".join(self.routes) or "-",
                )
                await self._serve(ws, tunnel, welcome.heartbeat)
                return True
            except ProtocolError as exc:
                log.error("relay broke the protocol: %s", exc)
                tunnel.fail(exc)
                with contextlib.suppress(Exception):
                    await tunnel.send_now()
                return False
            finally:
                self.connected.clear()
                self.tunnel = None
                tunnel.close(tunnel.close_reason or "session ended")
                await tunnel.aclose()

    async def _await_welcome(self, ws: ClientConnection, tunnel: Tunnel) -> p.WelcomeReceived:
        async with asyncio.timeout(self.config.connect_timeout):
            async for message in ws:
                if isinstance(message, str):
                    tunnel.feed_text(message)
                    continue
                for event in tunnel.feed(message):
                    if isinstance(event, p.WelcomeReceived):
                        return event
                    if isinstance(event, p.GoAwayReceived):
                        if event.code in FATAL_CODES:
                            raise AuthError(f"relay refused this bridge: {event.reason}")
                        raise ProtocolError(
                            f"relay sent GOAWAY before WELCOME: {event.reason}", p.ErrorCode.NO_ERROR
                        )
        raise ProtocolError("connection closed before WELCOME")

    async def _serve(self, ws: ClientConnection, tunnel: Tunnel, heartbeat: float) -> None:
        async def reader() -> None:
            async for message in ws:
                if isinstance(message, str):
                    tunnel.feed_text(message)
                    continue
                for event in tunnel.feed(message):
                    if isinstance(event, p.GoAwayReceived):
                        log.info("relay going away (code %d): %s", event.code, event.reason)

        read_task = asyncio.create_task(reader())
        beat_task = asyncio.create_task(tunnel.heartbeat(heartbeat, heartbeat * 3))
        stop_task = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait(
                {read_task, beat_task, stop_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if beat_task in done and not read_task.done():
                log.warning("no word from the relay for %.0f s: reconnecting", heartbeat * 3)
                tunnel.close("heartbeat timeout")
            elif stop_task in done:
                await self._drain(tunnel, read_task)
            elif read_task in done:
                exc = read_task.exception()
                if isinstance(exc, ProtocolError):
                    raise exc
                tunnel.close(f"relay closed the connection ({_describe(exc) if exc else ws.close_code})")
                log.warning("lost the relay: %s", tunnel.close_reason)
        finally:
            for task in (read_task, beat_task, stop_task):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task

    async def _drain(self, tunnel: Tunnel, read_task: asyncio.Task[None]) -> None:
        log.info("draining: %d stream(s) in flight", len(tunnel.streams))
        tunnel.conn.send_goaway(p.ErrorCode.NO_ERROR, "bridge draining")
        await tunnel.send_now()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        while (tunnel.streams or self._tasks) and loop.time() < deadline and not read_task.done():
            await asyncio.wait(
                self._tasks or {read_task},
                timeout=max(0.0, deadline - loop.time()),
                return_when=asyncio.FIRST_COMPLETED,
            )
        # The last frames of the streams just finished (their END) may still be queued for the
        # writer, which closing cancels: send them first, or the relay sees those responses cut.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(max(1.0, deadline - loop.time())):
                await tunnel.send_now()
        tunnel.close("drained")

    # ------------------------------------------------------------------------------ streams
    def _on_open(self, stream: Stream, event: p.StreamOpened) -> None:
        forward = self._forward_ws if event.info.get("websocket") is True else self._forward
        task = asyncio.create_task(forward(stream, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, stream: Stream, ev: p.StreamOpened) -> None:
        """A tunnelled HTTP request: the shared forwarding with the stream as both ends."""
        meter = RequestMeter(
            route=ev.route,
            method=ev.method,
            target=ev.target,
            via="tunnel",
            request_id=header(ev.headers, "x-request-id") or "",
        )
        body = None if ev.end_stream else _body(stream)
        await self.forward_http(
            ev.method, ev.route, ev.target, ev.headers, body, _TunnelDownstream(stream), meter
        )

    async def forward_http(
        self,
        method: str,
        route_name: str,
        target: str,
        headers: p.Headers,
        body: AsyncIterator[bytes] | None,
        down: Downstream,
        meter: RequestMeter,
    ) -> None:
        """Forward one HTTP request to the route's upstreams and stream the answer to ``down``,
        measuring it with ``meter``. The one forwarding path for tunnelled and local requests.

        Upstreams are tried least-outstanding first (ties round-robin); one that cannot be connected
        to is skipped, and the next tried, only while no byte of the request body has been read."""
        pool = self.pools.get(route_name)
        if pool is None:
            await down.fail(p.ErrorCode.NO_ROUTE, f"no route named {route_name!r}")
            self._record(meter.finish(error="no route"))
            return
        tracked = _MeteredBody(body, meter) if body is not None else None
        response: aiohttp.ClientResponse | None = None
        upstream: Upstream | None = None
        failure: tuple[int, str] = (p.ErrorCode.UPSTREAM_UNREACHABLE, f"{route_name}: no upstream")
        tried: set[Upstream] = set()
        session = self._upstream_session()
        while candidate := next((u for u in pool.candidates() if u not in tried), None):
            tried.add(candidate)
            if tracked is not None and tracked.started:
                break  # part of the body went to a failed upstream: it cannot be sent again
            pool.picked(candidate)
            candidate.outstanding += 1
            meter.sent(candidate.url)
            try:
                response = await session.request(
                    method,
                    URL(candidate.url + target, encoded=True),  # the target exactly as the client sent it
                    headers=self._upstream_headers(candidate.url, headers),
                    data=tracked,
                    allow_redirects=False,
                )
                upstream = candidate
                candidate.failed_at = 0.0
                break
            except BaseException as exc:
                candidate.outstanding -= 1
                if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
                    candidate.failed_at = time.monotonic()
                    failure = (p.ErrorCode.UPSTREAM_UNREACHABLE, f"{route_name} unreachable")
                    log.warning("%s upstream %s unreachable: %s", route_name, candidate.url, _describe(exc))
                    continue
                if isinstance(exc, StreamError) or (tracked is not None and tracked.client_gone):
                    failure = (0, "")  # the client went away while we were connecting or sending
                elif isinstance(exc, TimeoutError | aiohttp.ClientError | OSError):
                    # The details (an address, the library's words) go to the log, not into the RESET.
                    log.warning(
                        "%s %s%s failed before its answer: %s", method, route_name, target, _describe(exc)
                    )
                    timeout = isinstance(exc, TimeoutError)
                    failure = (
                        p.ErrorCode.UPSTREAM_TIMEOUT if timeout else p.ErrorCode.UPSTREAM_ERROR,
                        f"{route_name}: {'no answer in time' if timeout else 'upstream failed'}",
                    )
                else:
                    self._record(meter.finish(error="cancelled"))
                    raise
                break
        if response is None or upstream is None:
            if failure[0]:
                await down.fail(*failure)
            self._record(meter.finish(error=failure[1] or "client gone"))
            return
        error = ""
        complete = False
        try:
            head = strip_hop_by_hop(
                (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.raw_headers
            )
            meter.response(response.status, head)
            await down.start(response.status, head)
            async for chunk in response.content.iter_any():
                await down.write(chunk)
                meter.chunk(chunk)  # after it went on: measuring never delays a token
            complete = True
            await down.end()
        except StreamError:
            error = "client gone"  # cancelled by the client or the tunnel closed: closing aborts
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            error = f"upstream failed mid-response: {_describe(exc)}"
            log.warning("%s %s%s: %s", method, route_name, target, error)
            await down.fail(p.ErrorCode.UPSTREAM_ERROR, f"{route_name} failed mid-response")
        except BaseException:
            error = "cancelled"
            raise
        finally:
            upstream.outstanding -= 1
            if complete:
                response.release()  # the connection goes back to the pool
            else:
                response.close()  # an unread rest: the connection cannot be reused
            self._record(meter.finish(error=error))

    def _upstream_session(self) -> aiohttp.ClientSession:
        """The HTTP client toward the upstreams, for forwarding and for asking their models (made on
        first use, inside the running loop).

        aiohttp rather than httpx here: on the 2-core benchmark machine httpx's connection pool cost
        about half of the bridge's CPU per small request. Set up to forward exactly what the client
        sent: no headers of its own, no cookie jar (clients must never share cookies), no
        decompression, no redirects followed."""
        if self._upstream is None:
            self._upstream = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_timeout),
                auto_decompress=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
                trust_env=False,
            )
        return self._upstream

    async def _forward_ws(self, stream: Stream, ev: p.StreamOpened) -> None:
        """A client WebSocket: open one to the upstream, answer RESPONSE 101 (or the upstream's
        refusal), then carry messages as records both ways (docs/protocol.md)."""
        pool = self.pools.get(ev.route)
        if pool is None:
            stream.reset(p.ErrorCode.NO_ROUTE, f"no route named {ev.route!r}")
            return
        chosen = pool.candidates()[0]
        pool.picked(chosen)
        route = Route(ev.route, chosen.url)
        url = "ws" + route.url.removeprefix("http") + ev.target
        subprotocols = [
            s.strip()
            for name, value in ev.headers
            if name.lower() == "sec-websocket-protocol"
            for s in value.split(",")
            if s.strip()
        ]
        headers = [
            (k, v)
            for k, v in self._upstream_headers(route.url, ev.headers)
            if k.lower() not in ("host", "origin", "content-length", "sec-websocket-protocol")
            and not k.lower().startswith("sec-websocket-")
        ]
        has_origin = any(k.lower() == "origin" for k, _ in ev.headers)
        conn = stream.tunnel.conn
        try:
            upstream = await websockets.connect(
                url,
                additional_headers=headers,
                subprotocols=[Subprotocol(s) for s in subprotocols] or None,
                origin=Origin(origin_of(route.url)) if has_origin else None,
                open_timeout=self.config.connect_timeout,
                max_size=p.MAX_WS_MESSAGE,
                compression=None,
                user_agent_header=None,
                ping_interval=20,
            )
        except InvalidStatus as exc:
            if not stream.done:
                response = exc.response
                conn.send_response(stream.id, response.status_code, list(response.headers.raw_items()))
                stream.tunnel.flush()
                with contextlib.suppress(StreamError):
                    await stream.write(bytes(response.body or b""), end=True)
                if stream.id in conn.streams:
                    stream.reset(p.ErrorCode.NO_ERROR, "refused")
                else:
                    stream.tunnel.forget(stream)
            return
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            stream.reset(p.ErrorCode.UPSTREAM_UNREACHABLE, f"{route.name} websocket: {_describe(exc)}")
            return
        try:
            if stream.done:
                return
            head = [("sec-websocket-protocol", str(upstream.subprotocol))] if upstream.subprotocol else []
            conn.send_response(stream.id, 101, head)
            stream.tunnel.flush()
            await _splice_upstream_ws(stream, upstream)
        finally:
            await upstream.close()
            if stream.id in conn.streams and not stream.done:
                stream.reset(p.ErrorCode.NO_ERROR, "websocket closed")
            stream.tunnel.forget(stream)

    # ------------------------------------------------------------------------------ metering
    def _record(self, rec: dict[str, Any]) -> None:
        """A finished request: JSONL line, one log line, and a STATS frame to the relay."""
        self.metrics.write(rec)
        if rec.get("model") or "ttft_s" in rec or "completion_tokens" in rec:
            log.info("%s", describe(rec))
        else:
            log.debug("%s", describe(rec))
        body = {k: rec[k] for k in STATS_REQUEST_FIELDS if k in rec}
        self.prom.publish(self.node, body)
        if self._stats_limit.allow():
            self._send_stats(body)

    def _send_stats(self, body: dict[str, Any]) -> None:
        """Publish one STATS body to the relay when connected (else it is only in the JSONL log)."""
        tunnel = self.tunnel
        if tunnel is None or tunnel.closed or not tunnel.conn.established:
            return
        try:
            tunnel.conn.send_stats(body)
        except LocalProtocolError as exc:
            log.debug("STATS not sent: %s", exc)
            return
        tunnel.flush()

    def _node_facts(self) -> dict[str, Any]:
        facts: dict[str, Any] = {"kind": "node", "software": f"kaggle-bridge/{__version__}", **self._facts}
        if self.options.gpu_mode:
            facts["gpu_mode"] = self.options.gpu_mode
        facts["upstreams"] = [f"{pool.name}={len(pool.upstreams)}" for pool in self.pools.values()]
        if self.models:
            facts["models"] = self.models
        return facts

    async def _models_loop(self) -> None:
        """Ask the upstreams for their models now and every :data:`MODELS_EVERY` seconds; tell the
        relay when the list changes (a model pulled or removed while connected)."""
        while not self._stopping.is_set():
            found: set[str] = set()
            for pool in self.pools.values():
                for upstream in pool.upstreams:
                    found.update(await self._models_of(upstream.url))
            models = sorted(found)
            if models and models != self.models:
                self.models = models
                log.info("models: %s", ", ".join(models))
                self._send_stats(self._node_facts())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), MODELS_EVERY)

    async def _models_of(self, url: str) -> list[str]:
        """The models one upstream lists: Ollama's ``/api/tags`` or an OpenAI-style ``/v1/models``;
        empty for anything else (Open WebUI, a plain web server, an upstream that is down)."""
        session = self._upstream_session()
        for path, key, field in (("/api/tags", "models", "name"), ("/v1/models", "data", "id")):
            try:
                async with session.get(
                    URL(url + path, encoded=True),
                    headers={"Host": host_of(url)},
                    timeout=aiohttp.ClientTimeout(total=3),
                ) as r:
                    items = (await r.json(content_type=None)).get(key) if r.status == 200 else None
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
                continue
            if isinstance(items, list):
                names = [i.get(field) for i in items if isinstance(i, dict)]
                return [n for n in names if isinstance(n, str) and n][:64]
        return []

    async def _sample_loop(self) -> None:
        """Sample GPUs and host every ``sample_interval`` seconds: JSONL line and STATS frame."""
        from .sampler import Sampler

        sampler = await asyncio.to_thread(Sampler)
        try:
            self._facts = await asyncio.to_thread(sampler.facts)
            facts = self._node_facts()
            self.metrics.write({**facts, "ts": round(time.time(), 3)})
            self._send_stats(facts)
            while True:
                sample = await asyncio.to_thread(sampler.sample)
                self.last_sample = sample
                self.metrics.write(sample)
                self.prom.publish(self.node, sample)
                if time.monotonic() - self._stats_sent_at >= self._stats_every:
                    self._stats_sent_at = time.monotonic()
                    self._send_stats({k: v for k, v in sample.items() if k != "ts"})
                await asyncio.sleep(self.options.sample_interval)
        finally:
            await asyncio.to_thread(sampler.close)

    # ------------------------------------------------------------------------------ local endpoint
    async def _start_local(self) -> _LocalServer:
        host, port = parse_listen(self.options.listen)
        if not is_loopback(host) and not self.options.listen_key:
            raise ConfigError(
                f"refusing to serve {host}:{port} without a key: set --listen-key (BRIDGE_LISTEN_KEY) "
                "or listen on a loopback address"
            )
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
        sock.listen(256)
        sock.setblocking(False)
        self.local_port = int(sock.getsockname()[1])
        import uvicorn

        server = _LocalServer(
            uvicorn.Config(
                _LocalApp(self),
                log_level="warning",
                access_log=False,
                lifespan="off",
                ws="none",
                timeout_graceful_shutdown=int(self.config.drain_timeout) or 1,
            ),
            sock,
        )
        shown = f"[{host}]" if ":" in host else host
        log.info(
            "local endpoint on http://%s:%d/ (routes at /r/<route>/, %s at /)%s",
            shown,
            self.local_port,
            self.default_route or "no route",
            " (key required)" if self.options.listen_key else "",
        )
        self.local_ready.set()
        return server

    def _upstream_headers(self, url: str, headers: p.Headers) -> list[tuple[str, str]]:
        """Client headers for the upstream: Host rewritten (Ollama answers 403 to a foreign Host),
        Origin rewritten to the upstream's own origin (Ollama checks it against OLLAMA_ORIGINS)."""
        out = [("Host", host_of(url))]
        for name, value in strip_hop_by_hop(headers):
            lname = name.lower()
            if lname == "host" or (lname == "content-length" and value == ""):
                continue
            if lname == "origin":
                value = origin_of(url)
            out.append((name, value))
        return out


async def _splice_upstream_ws(stream: Stream, upstream: ClientConnection) -> None:
    """Carry messages both ways between the stream's records and the upstream WebSocket."""

    async def down() -> None:  # upstream -> relay
        try:
            async for message in upstream:
                if isinstance(message, str):
                    await stream.write(p.encode_ws_record(p.WS_TEXT, message.encode()))
                else:
                    await stream.write(p.encode_ws_record(p.WS_BINARY, message))
        except websockets.ConnectionClosed:
            pass
        code = upstream.close_code if upstream.close_code is not None else 1006
        await stream.write(p.encode_ws_close(code, upstream.close_reason or ""), end=True)

    async def up() -> None:  # relay -> upstream
        reader = p.WsRecordReader()
        while chunk := await stream.read():
            for opcode, payload in reader.feed(chunk):
                if opcode == p.WS_TEXT:
                    await upstream.send(payload.decode("utf-8", "replace"))
                elif opcode == p.WS_BINARY:
                    await upstream.send(payload)
                else:
                    code, reason = p.decode_ws_close(payload)
                    await upstream.close(code if code not in (1005, 1006, 1015) else 1000, reason)
                    return

    tasks = [asyncio.create_task(down()), asyncio.create_task(up())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            exc = task.exception()
            if isinstance(exc, ProtocolError):
                stream.reset(exc.code, str(exc))
            elif exc is not None and not isinstance(exc, StreamError | websockets.ConnectionClosed | OSError):
                raise exc
        if tasks[1] in done and not tasks[0].done():
            # The client closed: let the upstream's answer to the close travel back.
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(tasks[0], 5)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------- local endpoint
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _LocalServer(uvicorn.Server):
    """uvicorn on a socket bound beforehand, without its own signal handling (the bridge's)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self._sock = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_forever(self) -> None:
        await self.serve(sockets=[self._sock])


class _LocalDownstream:
    def __init__(self, send: Send, route: str) -> None:
        self._send = send
        self._route = route
        self.started = False
        self.finished = False
        self.aborted = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        await self._send({"type": "http.response.start", "status": status, "headers": raw})

    async def write(self, data: bytes) -> None:
        if data:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def fail(self, code: int, reason: str) -> None:
        if self.started:
            self.aborted = True  # the app raises: uvicorn cuts the connection, the client sees it
            return
        self.finished = True
        status, words = failure_words(code, self._route)  # the relay's words for the same failure
        await _local_json(self._send, status, {"error": words, "code": code})


async def _local_json(send: Send, status: int, obj: dict[str, Any]) -> None:
    body = json.dumps(obj).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _LocalApp:
    """The ASGI app of the local endpoint: ``/r/<route>/...`` and the default route at ``/``,
    forwarded by :meth:`Bridge.forward_http` exactly as tunnelled requests are."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        key = bridge.options.listen_key
        self._key = key.encode() if key else b""

    def _authorized(self, headers: list[tuple[str, str]]) -> tuple[bool, list[tuple[str, str]]]:
        if not self._key:
            return True, headers
        ok = False
        rest = []
        for name, value in headers:
            lname = name.lower()
            given = ""
            if lname == "authorization" and value[:7].lower() == "bearer ":
                given = value[7:].strip()
            elif lname == "x-bridge-key":
                given = value.strip()
            if given and hmac.compare_digest(given.encode(), self._key):
                ok = True
                continue  # the key is for us, not for the upstream
            rest.append((name, value))
        return ok, rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        ok, headers = self._authorized(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        )
        if not ok:
            await _local_json(send, 401, {"error": "a key is required (Authorization: Bearer <key>)"})
            return
        raw = scope.get("raw_path") or scope["path"].encode("utf-8")
        path = raw.decode("latin-1")
        if path == "/_bridge/metrics":
            payload = prom.generate_latest(self.bridge.registry)
            head = [
                (b"content-type", prom.CONTENT_TYPE_LATEST.encode()),
                (b"content-length", b"%d" % len(payload)),
            ]
            await send({"type": "http.response.start", "status": 200, "headers": head})
            await send({"type": "http.response.body", "body": payload, "more_body": False})
            return
        route, target = self.bridge.default_route, path
        if path.startswith("/r/"):
            route, _, rest = path[3:].partition("/")
            target = "/" + rest
        if route not in self.bridge.pools:
            await _local_json(send, 404, {"error": f"no route named {route!r}"})
            return
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        method: str = scope["method"]
        meter = RequestMeter(
            route=route,
            method=method,
            target=target,
            via="local",
            request_id=header(headers, "x-request-id") or "",
        )
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        more = bool(first.get("more_body"))
        data: bytes = first.get("body", b"")
        length = header(headers, "content-length")
        has_body = (
            more or bool(data) or (length not in (None, "", "0")) or header(headers, "transfer-encoding")
        )
        body_done = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            nonlocal more
            try:
                if data:
                    yield data
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise StreamError(p.ErrorCode.CANCEL, "client gone")
                    more = bool(message.get("more_body"))
                    if message.get("body"):
                        yield message["body"]
            finally:
                body_done.set()

        if not has_body:
            body_done.set()
        down = _LocalDownstream(send, route)
        task = asyncio.create_task(
            self.bridge.forward_http(
                method, route, target, headers, body() if has_body else None, down, meter
            )
        )

        async def watch() -> None:  # the client going away cancels the forwarding (and the upstream's work)
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not down.finished:
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({task})
        finally:
            watcher.cancel()
            task.cancel()
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
        if down.aborted:
            raise ConnectionAbortedError("upstream failed mid-response")


async def _body(stream: Stream) -> AsyncIterator[bytes]:
    while chunk := await stream.read():
        yield chunk


def _hint(value: Any, most: float) -> float:
    """A WELCOME hint in seconds (extra keys ``coalesce``, ``stats_interval``): 0 when absent or
    not a number, else clamped to ``0 … most``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0.0
    return min(max(float(value), 0.0), most)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


async def connect(config: BridgeConfig, options: BridgeOptions | None = None) -> None:
    """Run a bridge until SIGINT/SIGTERM (then drain). Used by ``bridge connect``."""
    bridge = Bridge(config, options)
    loop = asyncio.get_running_loop()
    stops = 0

    def on_signal() -> None:
        nonlocal stops
        stops += 1
        if stops == 1:
            log.info("stopping: draining streams in flight (signal again to quit now)")
            bridge.stop()
        else:
            raise SystemExit(1)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)
    await bridge.run()
