"""The one forwarding path: a request to a node and back, for every kind of client the relay has
(a proxied HTTP request, a generation shared by repeated requests, a job, a client WebSocket).

:meth:`Forwarder.exchange` acquires a node (waiting ``grace`` for one), checks that it serves the
route, OPENs the stream, lets the caller's ``pump`` send the body, and waits for the answer's head;
when the node vanishes before answering and the request can be sent again, it tries once more on
another node. It gives the caller either the :class:`Exchange` (a node answered) or the
:class:`Answer` the relay gives in its place, and cleans the stream up when the caller is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from ..affinity import PEEK_LIMIT, Conversation, conversation_key
from ..asgi import Send, raw_headers, respond
from ..errors import HeadersTooLarge, StreamError
from ..httprules import Headers, failure_words
from ..tunnel.stream import Stream
from ..wire.constants import ErrorCode
from ..wire.events import ResponseReceived
from .metrics import RelayMetrics
from .pool import NodeSession, Pool, Want

log = logging.getLogger("bridge.relay")

#: Stream failures that mean the node never answered: the request may go to another node, once.
RETRY_CODES = frozenset({ErrorCode.REFUSED_STREAM, ErrorCode.GOING_AWAY, ErrorCode.TOO_MANY_STREAMS})
#: The reason of the RESET a relay sends when a client stopped sending its request body.
BODY_STALLED = "request body stalled"


@dataclass(slots=True)
class Request:
    """What the relay forwards: the request head as the node gets it, and its body when the relay
    holds it whole (``None``: it streams from the client and cannot be sent twice)."""

    method: str
    route: str
    target: str
    headers: Headers
    body: bytes | None
    client: str
    has_body: bool = False
    websocket: bool = False
    #: The client's path prefix of the route (``/r/<route>``; "" at ``/`` or a route port): the
    #: cookies an upstream sets are scoped under it (httprules.response_headers).
    prefix: str = ""

    @property
    def model(self) -> str | None:
        """The ``model`` an Ollama or OpenAI-style request names, if any."""
        value = json_object(self.body)
        model = value.get("model") if value else None
        return model if isinstance(model, str) and model else None

    @property
    def conversation(self) -> Conversation | None:
        """The conversation a POST continues (bridge/affinity.py), from the first
        :data:`~bridge.affinity.PEEK_LIMIT` bytes of a body the relay holds; None for others."""
        if self.method != "POST" or not self.body:
            return None
        return conversation_key(self.body[:PEEK_LIMIT])

    @property
    def deterministic(self) -> bool:
        """A generation whose answer does not depend on chance: temperature 0 (OpenAI's top-level
        ``temperature`` or Ollama's ``options.temperature``)."""
        value = json_object(self.body)
        if value is None:
            return False
        options = value.get("options")
        temperature = value.get(
            "temperature", options.get("temperature") if isinstance(options, dict) else None
        )
        return isinstance(temperature, int | float) and not isinstance(temperature, bool) and temperature == 0


def json_object(body: bytes | None) -> dict[str, Any] | None:
    if not body or body[:1] != b"{":
        return None
    try:
        value = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


# ------------------------------------------------------------------------------------------ answers


@dataclass(frozen=True)
class Answer:
    """A JSON response the relay gives in the upstream's place: a request it cannot forward, or one
    whose stream failed before the answer came. The same bytes on every path (plain, shared by
    repeated requests, jobs), so every client of one request sees the same complete response."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()

    def encode(self) -> tuple[Headers, bytes]:
        """The headers (no Content-Length) and the body."""
        head = [("content-type", "application/json"), ("cache-control", "no-store"), *self.headers]
        return head, json.dumps(self.body).encode()

    @property
    def message(self) -> str:
        return str(self.body.get("error", ""))


NO_BRIDGE = Answer(503, {"error": "no bridge is connected; try again shortly"}, (("retry-after", "10"),))
RELAY_DRAINING = Answer(503, {"error": "relay is shutting down"}, (("retry-after", "5"),))
HEAD_TOO_LARGE = Answer(431, {"error": "request header fields too large"})
INVALID_HEAD = Answer(502, {"error": "bridge: invalid response from the upstream"})
STALLED = Answer(408, {"error": BODY_STALLED})
INVALID_REQUEST = Answer(400, {"error": "invalid method or request target"})


def unknown_route(route: str = "") -> Answer:
    return Answer(404, {"error": f"unknown route {route!r}" if route else "unknown route"})


def stream_failed(code: int, route: str) -> Answer:
    """The answer to a stream reset with ``code`` before its response: words from the code alone
    (the bridge's reason may name an upstream's address: it goes to the logs, not to clients)."""
    status, words = failure_words(code, route)
    return Answer(status, {"error": words, "code": code}, (("retry-after", "5"),) if status == 503 else ())


async def send_answer(send: Send, answer: Answer) -> None:
    headers, body = answer.encode()
    await respond(send, answer.status, raw_headers(headers), body)


# ------------------------------------------------------------------------------------------ the path


@dataclass
class Exchange:
    """A node answered: the stream (read the body from it) and the answer's head."""

    session: NodeSession
    stream: Stream
    head: ResponseReceived


#: Sends the request body on the stream (and may watch the client); run beside the wait for the head.
Pump = Callable[[Stream], Coroutine[Any, Any, None]]


class Forwarder:
    def __init__(self, pool: Pool, metrics: RelayMetrics) -> None:
        self.pool = pool
        self.metrics = metrics

    def exchange(
        self, request: Request, want: Want, *, pump: Pump | None = None, resend: bool = False
    ) -> Forwarding:
        """Forward ``request`` (see the module docstring): ``async with forwarder.exchange(...) as
        outcome``. ``pump`` runs while the head is awaited and until the caller is done; ``resend``:
        the request may be sent to a second node when the first vanished before answering (nothing
        of it was lost: its body is held whole)."""
        return Forwarding(self, request, want, pump, resend)


class Forwarding:
    """One request on the forwarding path, as an async context manager: entering gives the
    :class:`Exchange` or the :class:`Answer`; leaving cancels the pump and frees the stream."""

    __slots__ = ("_forwarder", "_pump", "_resend", "_task", "request", "stream", "want")

    def __init__(
        self, forwarder: Forwarder, request: Request, want: Want, pump: Pump | None, resend: bool
    ) -> None:
        self._forwarder = forwarder
        self._pump = pump
        self._resend = resend
        self._task: asyncio.Task[None] | None = None
        self.request = request
        self.stream: Stream | None = None
        self.want = want

    async def __aenter__(self) -> Exchange | Answer:
        request, want = self.request, self.want
        for attempt in (1, 2):
            session = await self._forwarder.pool.acquire(want)
            if session is None:
                return NO_BRIDGE
            if session.routes and request.route not in session.routes:
                return unknown_route(request.route)
            try:
                stream = self.stream = open_stream(session, request)
            except HeadersTooLarge:
                return HEAD_TOO_LARGE
            if self._pump is not None:
                self._task = asyncio.create_task(self._pump(stream))
            try:
                return Exchange(session, stream, await stream.response())
            except StreamError as exc:
                if self._task is not None:
                    self._task.cancel()
                if exc.reason == BODY_STALLED:
                    return STALLED
                if attempt == 1 and self._resend and exc.code in RETRY_CODES:
                    log.info(
                        "node %s lost %s %s before answering: retrying once",
                        session.node,
                        request.method,
                        request.route,
                    )
                    self._forwarder.metrics.retries.inc()
                    stream.tunnel.forget(stream)
                    want = dataclasses.replace(want, exclude=want.exclude | {session}, sticky=None)
                    continue
                log.info("stream of %s %s failed before its answer: %s", request.method, request.route, exc)
                return stream_failed(exc.code, request.route)
        raise AssertionError("unreachable: the second attempt returns")

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
        stream = self.stream
        if stream is not None and not stream.done:
            if stream.id in stream.tunnel.conn.streams:
                stream.reset(ErrorCode.CANCEL, "client went away")
            stream.tunnel.forget(stream)


def open_stream(session: NodeSession, request: Request) -> Stream:
    """OPEN a stream for ``request`` on ``session``. Raises HeadersTooLarge for an oversized head."""
    tunnel = session.tunnel
    sid = tunnel.conn.next_stream_id()
    extra = {"websocket": True} if request.websocket else {}
    tunnel.conn.open_stream(
        sid,
        request.method,
        request.route,
        request.target,
        request.headers,
        end_stream=not request.has_body and not request.websocket,
        client=request.client,
        **extra,
    )
    stream = tunnel.add_stream(sid)
    tunnel.flush()
    return stream
