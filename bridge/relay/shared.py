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
from collections.abc import AsyncIterator, Callable, Coroutine
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
    """One response, recorded as it arrives. The producer calls :meth:`start`, :meth:`append`
    (then awaits :meth:`room`), then :meth:`finish` (or :meth:`fail`), or :meth:`answer` alone;
    readers :meth:`join`, await :meth:`head`, iterate :meth:`body` and :meth:`leave`.

    Up to ``max_bytes`` the whole answer is kept, so a reader may join at any time and replay it
    from the first byte. Past it the answer *overflows*: it can no longer be replayed (a cache
    drops it), but every reader already reading still gets it whole, in bounded memory: chunks all
    readers passed are dropped, and :meth:`room` holds the producer while the slowest reader is
    more than ``max_bytes`` behind. An overflowing answer nobody reads is not produced further."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        #: The chunks held; ``chunks[0]`` is chunk number ``base`` of the answer (0 until it overflowed).
        self.chunks: list[bytes] = []
        self.base = 0
        #: Bytes in ``chunks`` (kept as they change: summed per chunk it cost O(chunks held)).
        self.held = 0
        #: Bytes held for replay (the whole answer until it overflowed).
        self.size = 0
        self.done = False
        self.error: str | None = None  # set when the response broke off mid-body
        #: Set when the relay answered in the upstream's place (the request failed before an answer).
        self.refused: str | None = None
        self.overflow = False
        self.finished_at: float | None = None
        #: Each reader's next chunk number, by reader token.
        self._readers: dict[int, int] = {}
        self._next_reader = 0
        #: Whether a cache holds it (new readers may join): see :meth:`leave`.
        self.cached = False
        #: The task producing it, stopped when nobody reads it and nobody can join it.
        self.task: asyncio.Task[None] | None = None
        #: Told of bytes kept for replay (a cache's accounting), and of the overflow.
        self.on_grow: Callable[[Shared, int], None] | None = None
        #: The bytes of it a cache counts.
        self.counted = 0
        self._changed = asyncio.Event()
        self._started = asyncio.Event()

    # producer ---------------------------------------------------------------------------------
    def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status, self.headers = status, headers
        self._started.set()
        self._wake()

    def append(self, chunk: bytes) -> None:
        if not self.overflow and self.size + len(chunk) > self.max_bytes:
            self.overflow = True  # no longer replayable; readers already reading get it all
            if self.on_grow is not None:
                self.on_grow(self, 0)
        self.held += len(chunk)
        if self.overflow:
            self.chunks.append(chunk)
            self._trim()
        else:
            self.chunks.append(chunk)
            self.size += len(chunk)
            if self.on_grow is not None:
                self.on_grow(self, len(chunk))
        self._wake()

    async def room(self) -> bool:
        """Wait until the readers of an overflowing answer caught up enough for one more chunk.
        False: it overflowed and nobody reads it (no use producing the rest)."""
        while self.overflow:
            if not self._readers:
                return False
            if self.held <= self.max_bytes:
                return True
            await self._changed.wait()
        return True

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
        self.chunks, self.size, self.base, self.held = [body], len(body), 0, len(body)
        self.refused = reason
        self.finish()

    @property
    def started(self) -> bool:
        return self._started.is_set()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _trim(self) -> None:
        """Past the overflow, drop the chunks every reader has passed."""
        if not self.overflow:
            return
        first = min(self._readers.values(), default=self.base + len(self.chunks))
        if first > self.base:
            passed = first - self.base
            self.held -= sum(len(c) for c in self.chunks[:passed])
            del self.chunks[:passed]
            self.base = first

    # readers ----------------------------------------------------------------------------------
    @property
    def ok(self) -> bool:
        """Finished whole: worth serving again from the cache."""
        return self.done and self.error is None and self.refused is None and not self.overflow

    @property
    def readers(self) -> int:
        return len(self._readers)

    def join(self) -> int:
        """A new reader, from the first byte: its token. Raises SharedOverflow when the start of the
        answer is gone (it overflowed before this reader came)."""
        if self.base:
            raise SharedOverflow("response too large to share")
        token = self._next_reader
        self._next_reader += 1
        self._readers[token] = 0
        return token

    def leave(self, token: int) -> None:
        """The reader is done (or gone). An unfinished answer that nobody reads and nobody can join
        (no cache holds it) is stopped: its stream is reset."""
        self._readers.pop(token, None)
        self._trim()
        self._wake()
        if not self._readers and not self.cached and not self.done and self.task is not None:
            self.task.cancel()

    async def head(self) -> tuple[int, list[tuple[str, str]]]:
        await self._started.wait()
        return self.status, self.headers

    async def body(self, token: int | None = None) -> AsyncIterator[bytes]:
        """Every chunk from the first, then live ones until the end, for the reader ``token`` (None:
        join now and leave at the end). Raises SharedOverflow when the start is gone, or
        ConnectionError when the response broke off."""
        own = token is None
        if token is None:
            token = self.join()
        try:
            while True:
                index = self._readers.get(token, self.base)
                while index < self.base + len(self.chunks):
                    chunk = self.chunks[index - self.base]
                    index += 1
                    self._readers[token] = index
                    if self.overflow:
                        self._trim()
                        self._wake()  # the producer may be waiting for room
                    yield chunk
                if self.done:
                    if self.error is not None:
                        raise ConnectionError(self.error)
                    return
                changed = self._changed
                await changed.wait()
        finally:
            if own:
                self.leave(token)

    def text(self) -> bytes:
        return b"".join(self.chunks)


class SharedCache:
    """Shared responses by (client key id, request identity), bounded three ways: at most
    ``max_entries`` answers, at most ``max_total`` bytes of them (all keys together), each kept
    ``ttl`` seconds after it finished. When full, the key holding the most bytes loses its oldest
    finished answer (one key cannot push another's out); a running answer is never evicted: a
    request that finds no room is served uncached (:meth:`put` gives None), and an answer whose
    growth finds no room leaves the cache (its readers still get it). An answer larger than
    ``max_bytes`` is never kept (see :class:`Shared`)."""

    def __init__(
        self, ttl: float, max_entries: int, max_bytes: int, max_total: int = 64 * 1024 * 1024
    ) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_total = max_total
        self._entries: OrderedDict[tuple[str, str], Shared] = OrderedDict()
        #: Bytes kept, all entries together.
        self.bytes = 0

    def get(self, key: tuple[str, str]) -> Shared | None:
        self._expire()
        entry = self._entries.get(key)
        if entry is not None and (entry.overflow or (entry.done and not entry.ok)):
            self._drop(key)  # a failed, refused or oversized answer is not served again
            return None
        return entry

    def put(self, key: tuple[str, str]) -> Shared | None:
        """A new answer kept under ``key``, or None when the cache is full of running answers."""
        self._expire()
        if key in self._entries:
            self._drop(key)
        while len(self._entries) >= self.max_entries or self.bytes >= self.max_total:
            if not self._evict():
                return None
        entry = Shared(self.max_bytes)
        entry.cached = True
        entry.on_grow = lambda e, n, key=key: self._grew(key, e, n)
        self._entries[key] = entry
        return entry

    def __len__(self) -> int:
        return len(self._entries)

    def _grew(self, key: tuple[str, str], entry: Shared, added: int) -> None:
        if self._entries.get(key) is not entry:
            return
        if entry.overflow:
            self._drop(key)
            return
        self.bytes += added
        entry.counted += added
        while self.bytes > self.max_total:
            if not self._evict(keep=key):
                self._drop(key)  # only running answers left: this one leaves the cache
                return

    def _evict(self, keep: tuple[str, str] | None = None) -> bool:
        """Drop the oldest finished answer of the key holding the most bytes (then the next key);
        False when every answer is still running."""
        held: dict[str, list[int]] = {}
        for (owner, _), entry in self._entries.items():
            stats = held.setdefault(owner, [0, 0])
            stats[0] += entry.size
            stats[1] += 1
        for owner in sorted(held, key=lambda o: held[o], reverse=True):
            for key, entry in self._entries.items():  # oldest first
                if key[0] == owner and entry.done and key != keep:
                    self._drop(key)
                    return True
        return False

    def _drop(self, key: tuple[str, str]) -> None:
        entry = self._entries.pop(key)
        self.bytes -= entry.counted
        entry.counted = 0
        entry.cached = False
        entry.on_grow = None
        if not entry.readers and not entry.done and entry.task is not None:
            entry.task.cancel()  # nobody reads it and nobody can join it now

    def _expire(self) -> None:
        now = time.monotonic()
        for key, entry in list(self._entries.items()):
            if entry.finished_at is not None and now - entry.finished_at > self.ttl:
                self._drop(key)


def identity(key_id: str, request: Request, ttl: float) -> tuple[str, str] | None:
    """What makes a request the same as an earlier one of the same client key: its
    ``Idempotency-Key``, or the SHA-256 of a deterministic POST body (temperature 0); and, either
    way, the upstream credentials it carries (``Authorization`` and ``Cookie`` as forwarded: a
    repeat with someone else's is another request). None: not shared (sharing off, a body not
    held whole, or neither)."""
    if ttl <= 0 or request.body is None:
        return None
    credentials = [v for k, v in request.headers if k.lower() in ("authorization", "cookie")]
    upstream = ""
    if credentials:
        upstream = ":as:" + hashlib.sha256("\n".join(credentials).encode("utf-8", "replace")).hexdigest()[:32]
    explicit = header(request.headers, "idempotency-key")
    if explicit:
        return key_id, f"key:{request.route}:{explicit[:256]}{upstream}"
    if request.method == "POST" and request.deterministic:
        digest = hashlib.sha256(
            f"{request.method} {request.route} {request.target}\n".encode() + request.body
        ).hexdigest()
        return key_id, f"sha256:{digest}{upstream}"
    return None


class SharedAnswers:
    """Serves repeated requests from one generation, and runs the generations of jobs."""

    def __init__(self, state: RelayState, cache: SharedCache, forwarder: Forwarder) -> None:
        self.state = state
        self.cache = cache
        self.forwarder = forwarder
        self._background: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a background task that outlives the request that started it."""
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def handle(
        self, send: Send, receive: Receive, key: tuple[str, str], request: Request, want: Want
    ) -> None:
        """Answer a request identified by ``key``: from the generation in flight or finished, or
        from a new one."""
        entry = self.cache.get(key)
        how = "joined" if entry is not None and not entry.done else "replayed"
        if entry is None:
            how = "new"
            # None: the cache is full of answers still running; this one is served uncached.
            entry = self.cache.put(key) or Shared(self.cache.max_bytes)
            entry.task = self.spawn(self.produce(entry, request, want))
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
                    self.state.metrics.request_bytes.inc(len(request.body))
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
                    self.state.metrics.response_bytes.inc(len(chunk))
                    entry.append(chunk)
                    if not await entry.room():  # too large to keep, and nobody reads it
                        entry.fail("response too large")
                        return
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
    token = entry.join()

    async def copy() -> None:
        status, headers = await entry.head()
        out = raw_headers(headers)
        out.append((b"x-bridge-idempotent", how.encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        with contextlib.suppress(ConnectionError):
            async for chunk in entry.body(token):
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
        entry.leave(token)
