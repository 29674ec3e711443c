"""The bridge's side of forwarding: a route's upstreams (replicas, least outstanding requests first),
one request forwarded to them with its answer streamed to a :class:`Downstream` (the tunnel stream,
or a client of the local endpoint), a client WebSocket opened to the upstream, and the models the
upstreams serve. The one forwarding path for tunnelled and local requests alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from ..affinity import PEEK_LIMIT, Affinity, Conversation, conversation_key
from ..config import Route
from ..errors import ProtocolError, StreamError, UpstreamError, UpstreamUnreachable
from ..httprules import (
    Headers,
    header,
    host_of,
    origin_of,
    stays_under_base,
    strip_hop_by_hop,
    upstream_headers,
)
from ..tunnel.stream import Stream
from ..tunnel.websocket import records, send_close, send_message, splice
from ..wire.constants import MAX_WS_MESSAGE, WS_BINARY, WS_TEXT, ErrorCode
from ..wire.events import StreamOpened
from ..wire.records import decode_ws_close
from .downstream import Downstream
from .http1 import Client, Response
from .metering import RequestMeter
from .ollama_front import OllamaFront

log = logging.getLogger("bridge.node")

#: An upstream that refused a connection is tried after the others for this long.
UPSTREAM_COOLDOWN = 5.0
#: The 400 for a target that would climb above a route's base path (``..``, however spelled).
OUTSIDE_ROUTE = b'{"error": "target outside the route"}'
OUTSIDE_ROUTE_HEAD = [("content-type", "application/json"), ("content-length", str(len(OUTSIDE_ROUTE)))]


class Upstream:
    """One URL of a route, with the number of requests it is serving now."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.outstanding = 0
        self.failed_at = 0.0  # monotonic time of the last connection failure (0: none)

    def cooling(self, now: float) -> bool:
        """Whether it refused a connection less than UPSTREAM_COOLDOWN seconds before ``now``."""
        return now - self.failed_at < UPSTREAM_COOLDOWN


class RoutePool:
    """A route's upstreams, in the order a request tries them (``balance``, see
    :data:`bridge.config.BALANCE_POLICIES`): least outstanding requests first, ties taken in turn
    (``least``); a conversation's own replica first unless it is overloaded (``affinity``, see
    bridge/affinity.py); or simply in turn (``round-robin``). Those that recently refused a
    connection come last in every policy."""

    def __init__(self, name: str, urls: list[str], balance: str = "affinity") -> None:
        self.name = name
        self.upstreams = [Upstream(u) for u in urls]
        self.balance = balance
        self.affinity: Affinity[Upstream] = Affinity()
        self._next = 0

    def candidates(self, now: float | None = None) -> list[Upstream]:
        """The upstreams by the pool's policy, those cooling (at ``now``, default the clock) last."""
        n = len(self.upstreams)
        if n == 1:
            return list(self.upstreams)
        now = time.monotonic() if now is None else now
        by_load = self.balance != "round-robin"
        order = sorted(
            range(n),
            key=lambda i: (
                self.upstreams[i].cooling(now),
                self.upstreams[i].outstanding if by_load else 0,
                (i - self._next) % n,
            ),
        )
        return [self.upstreams[i] for i in order]

    def order(self, conversation: Conversation | None) -> list[Upstream]:
        """The upstreams to try for a request of ``conversation`` (None: none known): with
        affinity, the conversation's replica moved to the front of those not cooling."""
        if conversation is None or self.balance != "affinity" or len(self.upstreams) < 2:
            return self.candidates()
        now = time.monotonic()
        candidates = self.candidates(now)
        healthy = [u for u in candidates if not u.cooling(now)]  # the cooling ones come last
        return [*self.affinity.choose(conversation, healthy, _outstanding), *candidates[len(healthy) :]]

    def picked(self, upstream: Upstream) -> None:
        self._next = (self.upstreams.index(upstream) + 1) % len(self.upstreams)

    def wants_key(self, method: str, headers: Headers) -> bool:
        """Whether a request's body is worth peeking at for its conversation: a POST with a JSON
        body (or none said) to a route with replicas that balances by affinity."""
        if self.balance != "affinity" or len(self.upstreams) < 2 or method != "POST":
            return False
        kind = header(headers, "content-type")
        return kind is None or "json" in kind.lower()


def _outstanding(u: Upstream) -> int:
    return u.outstanding


async def peek(body: AsyncIterator[bytes], limit: int = PEEK_LIMIT) -> tuple[bytes, AsyncIterator[bytes]]:
    """The first ``limit`` bytes of a body (fewer when it is shorter; a little more when a chunk
    crosses the limit), and the whole body again to send on. Never reads more than that ahead."""
    it = aiter(body)
    head: list[bytes] = []
    size = 0
    ended = False
    while size < limit:
        try:
            chunk = await anext(it)
        except StopAsyncIteration:
            ended = True
            break
        head.append(chunk)
        size += len(chunk)

    async def whole() -> AsyncIterator[bytes]:
        for chunk in head:
            yield chunk
        if not ended:
            async for chunk in it:
                yield chunk

    return b"".join(head)[:limit], whole()


class _MeteredBody:
    """The request body on its way to the upstream: counts bytes, and remembers whether any byte
    was read (after which the request cannot be retried on another upstream)."""

    def __init__(self, body: AsyncIterator[bytes], meter: RequestMeter) -> None:
        self._body = body
        self._meter = meter
        self.started = False
        #: The client went away while its body was being sent.
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


class Upstreams:
    """Every route's upstreams, and the HTTP client toward them. ``record`` takes the measurement
    of each request forwarded (the bridge logs and publishes it)."""

    def __init__(
        self,
        routes: tuple[Route, ...],
        connect_timeout: float,
        record: Callable[[dict[str, Any]], None],
        balance: str = "affinity",
    ) -> None:
        urls: dict[str, list[str]] = {}
        for r in routes:
            urls.setdefault(r.name, []).append(r.url)
        self.pools: dict[str, RoutePool] = {name: RoutePool(name, u, balance) for name, u in urls.items()}
        self.connect_timeout = connect_timeout
        self._record = record
        self._client: Client | None = None
        # Ollama's API in front of an OpenAI-only engine (routes given as NAME=openai+URL): the
        # front answers Ollama's paths itself and sends generations on through forward_http.
        self.fronts: dict[str, OllamaFront] = {
            r.name: OllamaFront(
                r.name,
                forward=self.forward_http,
                record=record,
                client=self.client,
                upstreams=lambda pool=self.pools[r.name]: [u.url for u in pool.candidates()],  # type: ignore[misc]
            )
            for r in routes
            if r.api == "openai"
        }

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def forward_http(
        self,
        method: str,
        route_name: str,
        target: str,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        down: Downstream,
        meter: RequestMeter,
    ) -> None:
        """Forward one HTTP request to the route's upstreams and stream the answer to ``down``,
        measuring it with ``meter``. The one forwarding path for tunnelled and local requests.

        Upstreams are tried in the pool's order (least-outstanding first, ties round-robin; with
        affinity, the replica that served the conversation's previous turn first, the body's first
        :data:`~bridge.affinity.PEEK_LIMIT` bytes read to know the conversation); one that cannot be
        connected to is skipped, and the next tried, only while no byte of the request body has
        been sent."""
        pool = self.pools.get(route_name)
        if pool is None:
            await down.fail(ErrorCode.NO_ROUTE, f"no route named {route_name!r}")
            self._record(meter.finish(error="no route"))
            return
        if not all(stays_under_base(u.url, target) for u in pool.upstreams):
            # `..` (however spelled) would climb above the route's base path: answered here.
            await down.start(400, list(OUTSIDE_ROUTE_HEAD))
            await down.write(OUTSIDE_ROUTE)
            await down.end()
            self._record(meter.finish(error="target outside the route"))
            return
        front = self.fronts.get(route_name)
        if front is not None and front.serves(method, target):  # Ollama's API on an OpenAI engine
            await front.handle(method, target, headers, body, down, meter)
            return
        conversation: Conversation | None = None
        if body is not None and pool.wants_key(method, headers):
            try:
                first, body = await peek(body)
            except StreamError:  # the client went away while sending its body
                self._record(meter.finish(error="client gone"))
                return
            conversation = conversation_key(first)
        tracked = _MeteredBody(body, meter) if body is not None else None
        response: Response | None = None
        upstream: Upstream | None = None
        failure: tuple[int, str] = (ErrorCode.UPSTREAM_UNREACHABLE, f"{route_name}: no upstream")
        tried: set[Upstream] = set()
        client = self.client()
        order = pool.order(conversation)
        while candidate := next((u for u in order if u not in tried), None):
            tried.add(candidate)
            if tracked is not None and tracked.started:
                break  # part of the body went to a failed upstream: it cannot be sent again
            pool.picked(candidate)
            candidate.outstanding += 1
            meter.sent(candidate.url)
            try:
                response = await client.request(
                    method,
                    candidate.url,
                    target,  # exactly as the client sent it
                    upstream_headers(candidate.url, headers),
                    tracked,
                )
                upstream = candidate
                candidate.failed_at = 0.0
                pool.affinity.served(conversation, candidate)
                break
            except BaseException as exc:
                candidate.outstanding -= 1
                if isinstance(exc, UpstreamUnreachable):
                    candidate.failed_at = time.monotonic()
                    # docs/protocol.md §11.4: refused -> UPSTREAM_UNREACHABLE (502); no answer to the
                    # connection within --connect-timeout -> UPSTREAM_TIMEOUT (504).
                    if exc.timeout:
                        failure = (ErrorCode.UPSTREAM_TIMEOUT, f"{route_name} timed out")
                    else:
                        failure = (ErrorCode.UPSTREAM_UNREACHABLE, f"{route_name} unreachable")
                    log.warning(
                        "%s upstream %s unreachable: %s", route_name, candidate.url, describe_error(exc)
                    )
                    order = pool.candidates()
                    continue
                if isinstance(exc, StreamError) or (tracked is not None and tracked.client_gone):
                    failure = (0, "")  # the client went away while we were connecting or sending
                elif isinstance(exc, TimeoutError | UpstreamError | OSError):
                    # The details (an address, the library's words) go to the log, not into the RESET.
                    log.warning(
                        "%s %s%s failed before its answer: %s",
                        method,
                        route_name,
                        target,
                        describe_error(exc),
                    )
                    timeout = isinstance(exc, TimeoutError)
                    failure = (
                        ErrorCode.UPSTREAM_TIMEOUT if timeout else ErrorCode.UPSTREAM_ERROR,
                        f"{route_name}: {'no answer in time' if timeout else 'upstream failed'}",
                    )
                else:
                    self._record(meter.finish(error=cancel_reason(exc)))
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
            head = strip_hop_by_hop(response.headers)
            meter.response(response.status, head)
            await down.start(response.status, head)
            async for chunk in response.chunks():
                await down.write(chunk)
                meter.chunk(chunk)  # after it went on: measuring never delays a token
            complete = True
            await down.end()
        except StreamError:
            error = "client gone"  # cancelled by the client or the tunnel closed: closing aborts
        except (UpstreamError, OSError, TimeoutError) as exc:
            error = f"upstream failed mid-response: {describe_error(exc)}"
            log.warning("%s %s%s: %s", method, route_name, target, error)
            await down.fail(ErrorCode.UPSTREAM_ERROR, f"{route_name} failed mid-response")
        except Exception:
            error = "internal error"  # a bug: the caller resets the stream and logs it
            raise
        except BaseException as exc:
            error = cancel_reason(exc)
            raise
        finally:
            upstream.outstanding -= 1
            if complete:
                response.release()  # the connection goes back to the pool
            else:
                response.close()  # an unread rest: the connection cannot be reused
            self._record(meter.finish(error=error))

    def client(self) -> Client:
        """The HTTP client toward the upstreams, for forwarding and for asking their models (made on
        first use, inside the running loop): bridge/node/http1/, which forwards exactly what the
        client sent (no headers of its own, no cookies, no decompression, no redirects followed)."""
        if self._client is None:
            self._client = Client(self.connect_timeout)
        return self._client

    async def forward_ws(self, stream: Stream, ev: StreamOpened) -> None:
        """A client WebSocket: open one to the upstream, answer RESPONSE 101 (or the upstream's
        refusal), then carry messages as records both ways (docs/protocol.md)."""
        pool = self.pools.get(ev.route)
        if pool is None:
            stream.reset(ErrorCode.NO_ROUTE, f"no route named {ev.route!r}")
            return
        if not all(stays_under_base(u.url, ev.target) for u in pool.upstreams):
            stream.tunnel.conn.send_response(stream.id, 400, list(OUTSIDE_ROUTE_HEAD))
            stream.tunnel.flush()
            with contextlib.suppress(StreamError):
                await stream.write(OUTSIDE_ROUTE, end=True)
            if stream.id in stream.tunnel.conn.streams:
                stream.reset(ErrorCode.NO_ERROR, "refused")
            else:
                stream.tunnel.forget(stream)
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
            for k, v in upstream_headers(route.url, ev.headers)
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
                open_timeout=self.connect_timeout,
                max_size=MAX_WS_MESSAGE,
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
                    stream.reset(ErrorCode.NO_ERROR, "refused")
                else:
                    stream.tunnel.forget(stream)
            return
        except (OSError, TimeoutError, websockets.InvalidHandshake) as exc:
            log.warning(
                "%s upstream %s websocket unreachable: %s", route.name, route.url, describe_error(exc)
            )
            stream.reset(ErrorCode.UPSTREAM_UNREACHABLE, f"{route.name} websocket unreachable")
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
                stream.reset(ErrorCode.NO_ERROR, "websocket closed")
            stream.tunnel.forget(stream)

    async def models_of(self, url: str) -> list[str]:
        """The models one upstream lists: Ollama's ``/api/tags`` or an OpenAI-style ``/v1/models``;
        empty for anything else (Open WebUI, a plain web server, an upstream that is down)."""
        client = self.client()
        for path, key, field in (("/api/tags", "models", "name"), ("/v1/models", "data", "id")):
            try:
                status, listing = await client.get_json(url, path, [("Host", host_of(url))], timeout=3)
                items = listing.get(key) if status == 200 else None
            except (UpstreamError, OSError, TimeoutError, ValueError, AttributeError):
                continue
            if isinstance(items, list):
                names = [i.get(field) for i in items if isinstance(i, dict)]
                # Bounded: they travel in HELLO and STATS, whose header block has a size limit.
                return [n for n in names if isinstance(n, str) and 0 < len(n) <= 200][:64]
        return []


async def _splice_upstream_ws(stream: Stream, upstream: ClientConnection) -> None:
    """Carry messages both ways between the stream's records and the upstream WebSocket."""

    async def down() -> None:  # upstream -> relay
        try:
            async for message in upstream:
                await send_message(stream, message)
        except websockets.ConnectionClosed:
            pass
        code = upstream.close_code if upstream.close_code is not None else 1006
        await send_close(stream, code, upstream.close_reason or "")

    async def up() -> None:  # relay -> upstream
        async for opcode, payload in records(stream):
            if opcode == WS_TEXT:
                await upstream.send(payload.decode("utf-8", "replace"))
            elif opcode == WS_BINARY:
                await upstream.send(payload)
            else:
                code, reason = decode_ws_close(payload)
                await upstream.close(code if code not in (1005, 1006, 1015) else 1000, reason)
                return

    async def failed(exc: BaseException) -> None:
        if isinstance(exc, ProtocolError):
            stream.reset(exc.code, str(exc))
        elif not isinstance(exc, StreamError | websockets.ConnectionClosed | OSError):
            raise exc

    await splice(down(), up(), failed)


def describe_error(exc: BaseException | None) -> str:
    if exc is None:
        return "closed"
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def cancel_reason(exc: BaseException) -> str:
    """What a forwarding ended by ``exc`` (not an Exception) is metered as: the reason a
    cancellation was given (:attr:`Stream.on_gone`: "client gone", "tunnel closed"), else
    "cancelled"."""
    if isinstance(exc, asyncio.CancelledError) and exc.args and isinstance(exc.args[0], str):
        return exc.args[0]
    return "cancelled"
