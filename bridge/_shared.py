"""Responses that outlive their client: idempotent joins and the job API (docs/protocol.md §11.8).

A :class:`Shared` response is produced once (by a task of the relay that reads one tunnel stream)
and consumed by any number of readers, each from the first byte, while it is still arriving or after
it finished. :class:`SharedCache` keeps them per client key for a bounded time and size.

It ends in one of three ways, and every reader sees the same one: whole (:meth:`Shared.finish`);
answered by the relay itself because the request failed before any answer came
(:meth:`Shared.answer`: a complete error response, served whole, never replayed later); or broken
off mid-body (:meth:`Shared.fail`: each reader's body raises, so its client sees a broken body).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import AsyncIterator

from .errors import SharedOverflow


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
