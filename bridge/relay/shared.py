"""Responses that outlive their client: idempotent joins and the job API (docs/protocol.md §11.8).

A :class:`Shared` response is produced once (:meth:`SharedAnswers.produce`, a task that forwards
the request and reads its stream) and consumed by any number of readers, each from the first byte,
while it is still arriving or after it finished. :class:`SharedCache` keeps them per client key for a
bounded time and size; :func:`identity` says which requests are the same.

It ends in one of three ways, and every reader sees the same one: whole (:meth:`Shared.finish`);
answered by the relay itself because the request failed before any answer came
(:meth:`Shared.answer`: a complete error response, served whole, never replayed later); or broken
off mid-body (:meth:`Shared.fail`: each reader's body raises, so its client sees a broken body).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from ..asgi import Receive, Send, raw_headers
from ..errors import SharedOverflow, StreamError
from ..httprules import header, response_headers
from ..tunnel.stream import Stream
from ..wire.constants import ErrorCode
from .forward import INVALID_HEAD, RELAY_DRAINING, Answer, Forwarder, Request
from .pool import Want
from .state import RelayState

log = logging.getLogger("bridge.relay")


class Shared:
    """One response, recorded as it arrives. The producer calls :meth:`start`, :meth:`append`,
    then :meth:`finish` (or :meth:`fail`), or :meth:`answer` alone; readers await :meth:`head` and
    iterate :meth:`body`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.done = False
        self.error: str | None = None  # set when the response broke off mid-body
        #: Set when the relay answered in the upstream's place (the request failed before an answer).
        self.refused: str | None = None
        self.overflow = False
        self.finished_at: float | None = None
        self.readers = 0
        self._changed = asyncio.Event()
        self._started = asyncio.Event()

    # producer ---------------------------------------------------------------------------------
    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers
        self._started.set()
        self._wake()

    def append(self, chunk: bytes) -> None:
        if self.overflow:
            return
        if self.size + len(chunk) > self.max_bytes:
            self.overflow = True
        else:
            self.chunks.append(chunk)
            self.size += len(chunk)
        self._wake()

    def finish(self) -> None:
        self.done = True
        self.finished_at = time.monotonic()
        self._started.set()
        self._wake()

    def fail(self, error: str) -> None:
        """The response broke off after :meth:`start`: readers' bodies raise ConnectionError."""
        self.error = error
        self.finish()

    def answer(self, status: int, headers: list[tuple[str, str]], body: bytes, reason: str) -> None:
        """The request failed before any answer (``reason``: why, in the words of the response): record
        the whole response the relay gives instead. Every reader gets it complete."""
        self.status = status
        self.headers = [*headers, ("content-length", str(len(body)))]
        self.chunks, self.size = [body], len(body)
        self.refused = reason
        self.finish()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # readers ----------------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """Finished whole: worth serving again from the cache."""
        return self.done and self.error is None and self.refused is None and not self.overflow

    async def head(self) -> tuple[int, list[tuple[str, str]]]:
        await self._started.wait()
        return self.status, self.headers

    async def body(self) -> AsyncIterator[bytes]:
        """Every chunk from the first, then live ones until the end. Raises SharedOverflow or
        ConnectionError when the response cannot be given whole."""
        index = 0
        while True:
            while index < len(self.chunks):
                yield self.chunks[index]
                index += 1
            if self.overflow:
                raise SharedOverflow("response too large to share")
            if self.done:
                if self.error is not None:
                    raise ConnectionError(self.error)
                return
            changed = self._changed
            await changed.wait()

    def text(self) -> bytes:
        return b"".join(self.chunks)


class SharedCache:
    """Shared responses by (client key id, request identity): at most ``max_entries``, each kept
    ``ttl`` seconds after it finished; entries in flight are never evicted by time."""

    def __init__(self, ttl: float, max_entries: int, max_bytes: int) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Shared] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Shared | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is not None and entry.done and not entry.ok:
            del self._entries[key]  # a failed, refused or oversized answer is not served again
            return None
        return entry

    def put(self, key: tuple[str, str]) -> Shared:
        self._expire()
        entry = Shared(self.max_bytes)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            oldest = next(iter(self._entries))
            del self._entries[oldest]
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def _expire(self) -> None:
        now = time.monotonic()
        for key, entry in list(self._entries.items()):
            if entry.finished_at is not None and now - entry.finished_at > self.ttl:
                del self._entries[key]


def identity(key_id: str, request: Request, ttl: float) -> tuple[str, str] | None:
    """What makes a request the same as an earlier one of the same client key: its
    ``Idempotency-Key``, or the SHA-256 of a deterministic POST body (temperature 0). None: not
    shared (sharing off, a body not held whole, or neither)."""
    if ttl <= 0 or request.body is None:
        return None
    explicit = header(request.headers, "idempotency-key")
    if explicit:
        return key_id, f"key:{request.route}:{explicit[:256]}"
    if request.method == "POST" and request.deterministic:
        digest = hashlib.sha256(
            f"{request.method} {request.route} {request.target}\n".encode() + request.body
        ).hexdigest()
        return key_id, f"sha256:{digest}"
    return None


class SharedAnswers:
    """Serves repeated requests from one generation, and runs the generations of jobs."""

    def __init__(self, state: RelayState, cache: SharedCache, forwarder: Forwarder) -> None:
        self.state = state
        self.cache = cache
        self.forwarder = forwarder
        self._background: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a background task that outlives the request that started it."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def handle(
        self, send: Send, receive: Receive, key: tuple[str, str], request: Request, want: Want
    ) -> None:
        """Answer a request identified by ``key``: from the generation in flight or finished, or
        from a new one."""
        entry = self.cache.get(key)
        how = "joined" if entry is not None and not entry.done else "replayed"
        if entry is None:
            how = "new"
            entry = self.cache.put(key)
            self.spawn(self.produce(entry, request, want))
        else:
            self.state.metrics.joins.inc()
            log.info("repeated %s %s %s: %s", request.method, request.route, request.target, how)
        await serve(entry, send, receive, how)

    async def produce(self, entry: Shared, request: Request, want: Want) -> None:
        """Run ``request`` on a node into ``entry``, whoever reads it (retried once, as any)."""
        self.state.metrics.started()
        status = 0

        def refuse(answer: Answer) -> None:
            nonlocal status
            status = answer.status
            headers, body = answer.encode()
            entry.answer(answer.status, headers, body, answer.message)

        async def pump(stream: Stream) -> None:
            with contextlib.suppress(StreamError):
                if request.body:
                    self.state.metrics.body_bytes.labels("request").inc(len(request.body))
                    await stream.write(request.body, end=True)

        try:
            async with self.forwarder.exchange(request, want, pump=pump, resend=True) as outcome:
                if isinstance(outcome, Answer):
                    refuse(outcome)
                    return
                head, stream = outcome.head, outcome.stream
                passed = response_headers(head.status, head.headers)
                if passed is None:
                    stream.reset(ErrorCode.PROTOCOL_ERROR, "invalid response head")
                    refuse(INVALID_HEAD)
                    return
                status = head.status
                entry.start(head.status, [*passed, ("x-bridge-node", outcome.session.node)])
                while chunk := await stream.read():
                    self.state.metrics.body_bytes.labels("response").inc(len(chunk))
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
            self.state.metrics.finished(request.route, status)
            if not self.state.metrics.in_flight:
                await self.state.pool.notify()


async def serve(entry: Shared, send: Send, receive: Receive, how: str) -> None:
    """Answer one client from a shared response, from its first byte, following it live."""
    status, headers = await entry.head()
    out = raw_headers(headers)
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
