"""The bridge: the notebook side. It dials OUT to the relay over one WebSocket, says HELLO with the
node token and its routes, and forwards every stream the relay opens to the named upstream (never to
an address a client names), streaming both ways with flow control.

It reconnects with capped exponential backoff and full jitter, sends a heartbeat (text ``ping``) every
interval the relay asked for, and treats silence for three intervals as a dead link. On SIGINT/SIGTERM
it drains: GOAWAY to the relay (which then holds new requests for the next bridge), finishes the
streams in flight, then closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import socket
from collections.abc import AsyncIterator

import httpx
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from . import __version__
from . import protocol as p
from ._config import BridgeConfig, Route
from ._exceptions import AuthError, ProtocolError, StreamError
from ._http import host_of, origin_of, strip_hop_by_hop
from ._tunnel import Stream, Tunnel

log = logging.getLogger("bridge.node")

#: GOAWAY codes after which reconnecting cannot help.
FATAL_CODES = {p.ErrorCode.UNAUTHORIZED, p.ErrorCode.UNSUPPORTED_VERSION}


class Bridge:
    """Run with :meth:`run`; stop with :meth:`stop` (graceful) or by cancelling."""

    def __init__(self, config: BridgeConfig) -> None:
        self.config = config
        self.routes: dict[str, Route] = {r.name: r for r in config.routes}
        self.node = config.node_name or socket.gethostname()
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.tunnel: Tunnel | None = None
        self.connected = asyncio.Event()
        self.sessions = 0
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(connect=config.connect_timeout, read=None, write=None, pool=None),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30),
            follow_redirects=False,
            trust_env=False,
        )
        self._client.headers.clear()  # forward exactly the client's headers, add none

    # ------------------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        """Connect, serve, reconnect, until :meth:`stop`. Raises AuthError on a refused token."""
        attempt = 0
        try:
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
            await self._client.aclose()

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
                conn.send_hello(
                    cfg.node_token, self.node, self.routes, software=f"kaggle-bridge/{__version__}"
                )
                await tunnel.send_now()
                welcome = await self._await_welcome(ws, tunnel)
                self.tunnel = tunnel
                self.sessions += 1
                self.connected.set()
                log.info(
                    "connected to %s as %s (session %s), routes %s",
                    cfg.relay,
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
        tunnel.close("drained")

    # ------------------------------------------------------------------------------ streams
    def _on_open(self, stream: Stream, event: p.StreamOpened) -> None:
        forward = self._forward_ws if event.info.get("websocket") is True else self._forward
        task = asyncio.create_task(forward(stream, event))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, stream: Stream, ev: p.StreamOpened) -> None:
        route = self.routes.get(ev.route)
        if route is None:
            stream.reset(p.ErrorCode.NO_ROUTE, f"no route named {ev.route!r}")
            return
        url = route.url + ev.target
        headers = self._upstream_headers(route, ev.headers)
        body = None if ev.end_stream else _body(stream)
        request = self._client.build_request(ev.method, url, headers=headers, content=body)
        try:
            response = await self._client.send(request, stream=True)
        except StreamError:
            return  # the relay cancelled while we were connecting
        except httpx.TimeoutException as exc:
            stream.reset(p.ErrorCode.UPSTREAM_TIMEOUT, f"{route.name}: {_describe(exc)}")
            return
        except httpx.ConnectError as exc:
            stream.reset(p.ErrorCode.UPSTREAM_UNREACHABLE, f"{route.name} unreachable: {_describe(exc)}")
            return
        except (httpx.HTTPError, OSError) as exc:
            stream.reset(p.ErrorCode.UPSTREAM_ERROR, f"{route.name}: {_describe(exc)}")
            return
        try:
            conn = stream.tunnel.conn
            if stream.done:
                return
            try:
                conn.send_response(
                    stream.id,
                    response.status_code,
                    strip_hop_by_hop(
                        (k.decode("latin-1"), v.decode("latin-1")) for k, v in response.headers.raw
                    ),
                )
            except ValueError:
                stream.reset(p.ErrorCode.UPSTREAM_ERROR, f"{route.name}: response head too large")
                return
            stream.tunnel.flush()
            async for chunk in response.aiter_raw():
                await stream.write(chunk)
            await stream.write(b"", end=True)
            if stream.id in conn.streams:  # upstream answered before reading the whole request body
                stream.reset(p.ErrorCode.NO_ERROR, "response complete")
            else:
                stream.tunnel.forget(stream)
        except StreamError:
            pass  # cancelled by the relay (client gone) or the tunnel closed: closing the response aborts
        except (httpx.HTTPError, OSError) as exc:
            log.warning(
                "%s %s%s: upstream failed mid-response: %s", ev.method, route.name, ev.target, _describe(exc)
            )
            stream.reset(p.ErrorCode.UPSTREAM_ERROR, f"{route.name} failed mid-response")
        finally:
            await response.aclose()

    async def _forward_ws(self, stream: Stream, ev: p.StreamOpened) -> None:
        """A client WebSocket: open one to the upstream, answer RESPONSE 101 (or the upstream's
        refusal), then carry messages as records both ways (docs/protocol.md)."""
        route = self.routes.get(ev.route)
        if route is None:
            stream.reset(p.ErrorCode.NO_ROUTE, f"no route named {ev.route!r}")
            return
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
            for k, v in self._upstream_headers(route, ev.headers)
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

    def _upstream_headers(self, route: Route, headers: p.Headers) -> list[tuple[str, str]]:
        """Client headers for the upstream: Host rewritten (Ollama answers 403 to a foreign Host),
        Origin rewritten to the upstream's own origin (Ollama checks it against OLLAMA_ORIGINS)."""
        out = [("Host", host_of(route.url))]
        for name, value in strip_hop_by_hop(headers):
            lname = name.lower()
            if lname == "host" or (lname == "content-length" and value == ""):
                continue
            if lname == "origin":
                value = origin_of(route.url)
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


async def _body(stream: Stream) -> AsyncIterator[bytes]:
    while chunk := await stream.read():
        yield chunk


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


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
