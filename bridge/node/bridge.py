"""The bridge: the notebook side. It dials OUT to the relay over one WebSocket, says HELLO with the
node token and its routes, and forwards every stream the relay opens to the named upstream (never to
an address a client names; :mod:`.upstream`), streaming both ways with flow control.

It reconnects with capped exponential backoff and full jitter, sends a heartbeat (text ``ping``) every
interval the relay asked for, and treats silence for three intervals as a dead link. On SIGINT/SIGTERM
it drains: GOAWAY to the relay (which then holds new requests for the next bridge), finishes the
streams in flight, then closes.

Every HTTP request it forwards is measured (:mod:`.metering`): one line per request in the JSONL log
under ``--metrics-dir``, one INFO log line per generation, and a STATS ``request`` frame to the relay,
which publishes it on ``/_relay/metrics``; GPU and host samples (:mod:`.sampler`) go the same ways.
With ``--listen`` it also serves its routes on a local HTTP endpoint (:mod:`.local`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import prometheus_client as prom
import websockets
from websockets.asyncio.client import ClientConnection

from .. import __version__
from ..config import BridgeConfig, node_name_from
from ..errors import AuthError, HeadersTooLarge, LocalProtocolError, ProtocolError, StreamError
from ..httprules import header
from ..ratelimit import RateLimiter
from ..stats import AffinityCounts, RelayStats
from ..tunnel.stream import Stream
from ..tunnel.tunnel import Tunnel
from ..wire.connection import Connection, Role
from ..wire.constants import MAX_MESSAGE, ErrorCode
from ..wire.events import Event, GoAwayReceived, StreamOpened, WelcomeReceived
from .local import LocalServer, start_local
from .metering import MetricsLog, RequestMeter, describe
from .upstream import Upstreams, describe_error

log = logging.getLogger("bridge.node")

#: GOAWAY codes after which reconnecting cannot help.
FATAL_CODES = {ErrorCode.UNAUTHORIZED, ErrorCode.UNSUPPORTED_VERSION}
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
#: Seconds between asking the upstreams which models they serve (Ollama's ``/api/tags``, else the
#: OpenAI-style ``/v1/models``); the relay routes a request naming a model to a node that lists it.
MODELS_EVERY = 60.0
#: Seconds an established session must last for the reconnect backoff to start over
#: (docs/spec/wire.md §10): a relay that closes right after WELCOME is retried with backoff.
STABLE_SESSION = 10.0
#: Seconds the WebSocket's close may take before the connection is dropped (a dead path with full
#: buffers: websockets' close first waits for them to drain, for ever).
CLOSE_TIMEOUT = 5.0


class TunnelDownstream:
    """The tunnel stream as the :class:`~bridge.node.downstream.Downstream` of a forwarded request."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        stream = self.stream
        if stream.done:
            raise stream.failure() if stream.error else StreamError(ErrorCode.CANCEL, "stream gone")
        try:
            stream.tunnel.conn.send_response(stream.id, status, headers)
        except HeadersTooLarge:
            stream.reset(ErrorCode.UPSTREAM_ERROR, "response head too large")
            raise StreamError(ErrorCode.UPSTREAM_ERROR, "response head too large") from None
        stream.tunnel.flush()

    async def write(self, data: bytes) -> None:
        await self.stream.write(data)

    async def end(self) -> None:
        stream = self.stream
        await stream.write(b"", end=True)
        if stream.id in stream.tunnel.conn.streams:  # upstream answered before reading the whole body
            stream.reset(ErrorCode.NO_ERROR, "response complete")
        else:
            stream.tunnel.forget(stream)
        # One turn of the loop: the tunnel's writer sends the end before the bookkeeping that
        # follows it (releasing the upstream connection, metering), not after.
        await asyncio.sleep(0)

    async def fail(self, code: int, reason: str) -> None:
        self.stream.reset(code, reason)


async def _close_or_abort(ws: ClientConnection) -> None:
    """Close the WebSocket within :data:`CLOSE_TIMEOUT`, else drop the TCP connection: on a dead
    path with full buffers websockets' close waits for them to drain before its own timeout starts."""
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await ws.close()
    except TimeoutError:
        log.info("the WebSocket did not close in %.0f s: dropping the connection", CLOSE_TIMEOUT)
        ws.transport.abort()
    except Exception as exc:  # already broken: nothing to close
        log.debug("closing the WebSocket: %r", exc)


class Bridge:
    """Run with :meth:`run`; stop with :meth:`stop` (graceful) or by cancelling."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.upstreams = Upstreams(config.routes, config.connect_timeout, self._record, config.balance)
        self.metrics = MetricsLog(config.metrics_dir)
        #: The same Prometheus series the relay publishes, for this bridge alone (local endpoint,
        #: ``/_bridge/metrics``): there even when the relay is out of reach.
        self.registry = prom.CollectorRegistry()
        self.prom = RelayStats(self.registry)
        self.registry.register(
            AffinityCounts(
                "bridge_affinity",
                ["route"],
                lambda: [([name], pool.affinity) for name, pool in self.upstreams.pools.items()],
            )
        )
        self._stats_limit = RateLimiter(config.stats_rate, max(1, int(config.stats_rate * 10)))
        self._facts: dict[str, Any] = {}
        self.last_sample: dict[str, Any] | None = None
        self.node = config.node_name or node_name_from(socket.gethostname())
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

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Connect, serve, reconnect, until :meth:`stop`. Raises AuthError on a refused token."""
        attempt = 0
        background: list[asyncio.Task[None]] = []
        server: LocalServer | None = None
        try:
            if self.config.listen:
                server = start_local(self.config, self.upstreams, self.registry)
                background.append(asyncio.create_task(server.serve_forever(), name="bridge-local"))
            if self.config.sample_interval > 0:
                background.append(asyncio.create_task(self._sample_loop(), name="bridge-sampler"))
            background.append(asyncio.create_task(self._models_loop(), name="bridge-models"))
            while not self._stopping.is_set():
                began = time.monotonic()
                try:
                    served = await self._session_or_stop()
                except (OSError, websockets.exceptions.WebSocketException, TimeoutError) as exc:
                    log.warning("relay unreachable: %s", describe_error(exc))
                    served = False
                if self._stopping.is_set():
                    break
                stable = served and time.monotonic() - began >= STABLE_SESSION
                attempt = 0 if stable else attempt + 1
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
            await self.upstreams.close()
            self.metrics.close()

    def stop(self) -> None:
        """Begin a graceful stop: drain streams in flight, then return from :meth:`run`."""
        self._stopping.set()

    async def _session_or_stop(self) -> bool:
        """:meth:`_session`, given up when a stop comes before the relay's WELCOME: nothing is in
        flight yet, and the handshake (a relay that accepts and never answers) would otherwise hold
        the stop for up to twice the connect timeout. Once connected, the session drains itself."""
        session = asyncio.create_task(self._session(), name="bridge-session")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({session, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not session.done() and not self.connected.is_set():
                session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await session
                return False
            return await session
        finally:
            stopping.cancel()
            if not session.done():  # run() itself cancelled
                session.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await session

    async def _session(self) -> bool:
        """One WebSocket session. True if it was established (so backoff starts over)."""
        cfg = self.config
        async with websockets.connect(
            cfg.connect_url,
            open_timeout=cfg.connect_timeout,
            ping_interval=None,
            max_size=2 * MAX_MESSAGE,
            compression=None,
            close_timeout=5,
            user_agent_header=f"kaggle-bridge/{__version__}",
        ) as ws:
            conn = Connection(
                Role.BRIDGE, window=cfg.window, max_frame=cfg.max_frame, max_streams=cfg.max_streams
            )
            tunnel = Tunnel(conn, ws.send, ws.send, on_open=self._on_open)
            try:
                extra: dict[str, Any] = {"models": self.models} if self.models else {}
                conn.send_hello(
                    cfg.node_token,
                    self.node,
                    cfg.route_names,
                    software=f"kaggle-bridge/{__version__}",
                    **extra,
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
                    ",".join(cfg.route_names) or "-",
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
                await _close_or_abort(ws)

    async def _await_welcome(self, ws: ClientConnection, tunnel: Tunnel) -> WelcomeReceived:
        async with asyncio.timeout(self.config.connect_timeout):
            async for event in _events(ws, tunnel):
                if isinstance(event, WelcomeReceived):
                    return event
                if isinstance(event, GoAwayReceived):
                    if event.code in FATAL_CODES:
                        raise AuthError(f"relay refused this bridge: {event.reason}")
                    raise ProtocolError(
                        f"relay sent GOAWAY before WELCOME: {event.reason}", ErrorCode.NO_ERROR
                    )
        raise ProtocolError("connection closed before WELCOME")

    async def _serve(self, ws: ClientConnection, tunnel: Tunnel, heartbeat: float) -> None:
        async def reader() -> None:
            async for event in _events(ws, tunnel):
                if isinstance(event, GoAwayReceived):
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
                tunnel.close(f"relay closed the connection ({describe_error(exc) if exc else ws.close_code})")
                log.warning("lost the relay: %s", tunnel.close_reason)
        finally:
            for task in (read_task, beat_task, stop_task):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await read_task

    async def _drain(self, tunnel: Tunnel, read_task: asyncio.Task[None]) -> None:
        log.info("draining: %d stream(s) in flight", len(tunnel.streams))
        tunnel.conn.send_goaway(ErrorCode.NO_ERROR, "bridge draining")
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
            await tunnel.send_now(max(1.0, deadline - loop.time()))
        tunnel.close("drained")

    # ------------------------------------------------------------------------------ streams
    def _on_open(self, stream: Stream, event: StreamOpened) -> None:
        task = asyncio.create_task(self._serve_stream(stream, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        # The client gone (RESET) or the tunnel lost: the forwarding stops, and with it the
        # upstream's work (its connection is closed), also while it has sent nothing yet.
        stream.on_gone = task.cancel

    async def _serve_stream(self, stream: Stream, event: StreamOpened) -> None:
        """Forward one stream. A failure the forwarding did not expect (a bug) resets the stream
        with INTERNAL_ERROR, so the relay answers 502 (or cuts a response already begun) instead of
        leaving its client waiting for an answer that never comes; the traceback goes to the log."""
        forward = self.upstreams.forward_ws if event.info.get("websocket") is True else self._forward
        try:
            await forward(stream, event)
        except Exception:
            log.exception("%s %s%s failed inside the bridge", event.method, event.route, event.target)
            stream.reset(ErrorCode.INTERNAL_ERROR, "bridge internal error")

    async def _forward(self, stream: Stream, ev: StreamOpened) -> None:
        """A tunnelled HTTP request: the shared forwarding with the stream as both ends."""
        meter = RequestMeter(
            route=ev.route,
            method=ev.method,
            target=ev.target,
            via="tunnel",
            request_id=header(ev.headers, "x-request-id") or "",
        )
        body = None if ev.end_stream else _body(stream)
        await self.upstreams.forward_http(
            ev.method, ev.route, ev.target, ev.headers, body, TunnelDownstream(stream), meter
        )

    # ------------------------------------------------------------------------------ streams
    # ------------------------------------------------------------------------------ metering
    def _record(self, rec: dict[str, Any]) -> None:
        """A finished request: JSONL line, one log line, and a STATS frame to the relay."""
        self.metrics.write(rec)
        if rec.get("model") or "ttft_s" in rec or "completion_tokens" in rec:
            log.info("%s", describe(rec))
        elif log.isEnabledFor(logging.DEBUG):
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
        if self.config.gpu_mode:
            facts["gpu_mode"] = self.config.gpu_mode
        facts["upstreams"] = [f"{pool.name}={len(pool.upstreams)}" for pool in self.upstreams.pools.values()]
        if self.models:
            facts["models"] = self.models
        return facts

    async def _models_loop(self) -> None:
        """Ask the upstreams for their models now and every :data:`MODELS_EVERY` seconds; tell the
        relay when the list changes (a model pulled or removed while connected)."""
        while not self._stopping.is_set():
            found: set[str] = set()
            for pool in self.upstreams.pools.values():
                for upstream in pool.upstreams:
                    found.update(await self.upstreams.models_of(upstream.url))
            models = sorted(found)[:128]  # with names of at most 200 characters: HELLO stays small
            if models and models != self.models:
                self.models = models
                log.info("models: %s", ", ".join(models))
                self._send_stats(self._node_facts())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), MODELS_EVERY)

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
                await asyncio.sleep(self.config.sample_interval)
        finally:
            await asyncio.to_thread(sampler.close)


async def _events(ws: ClientConnection, tunnel: Tunnel) -> AsyncIterator[Event]:
    """The events of the relay's messages that the tunnel leaves to its owner (heartbeats and
    stream frames it handles itself), until the WebSocket closes."""
    async for message in ws:
        if isinstance(message, str):
            tunnel.feed_text(message)
            continue
        for event in tunnel.feed(message):
            yield event


async def _body(stream: Stream) -> AsyncIterator[bytes]:
    while chunk := await stream.read():
        yield chunk


def _hint(value: Any, most: float) -> float:
    """A WELCOME hint in seconds (extra keys ``coalesce``, ``stats_interval``): 0 when absent or
    not a number, else clamped to ``0 … most``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return 0.0
    return min(max(float(value), 0.0), most)


async def connect(config: BridgeConfig) -> None:
    """Run a bridge until SIGINT/SIGTERM (then drain). Used by ``bridge connect``."""
    bridge = Bridge(config)
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
