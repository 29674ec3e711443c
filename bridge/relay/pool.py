"""The connected bridges (nodes) and which one a request goes to.

:func:`pick` is the decision, a pure function of the nodes and the request's :class:`Want`;
:class:`Pool` keeps the nodes and lets a request wait (``grace`` seconds) for one to connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..affinity import Affinity, Conversation
from ..tunnel.tunnel import Tunnel


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

    @property
    def open(self) -> bool:
        """Whether it takes new streams: connected, not draining, stream ids left."""
        return not self.draining and not self.tunnel.closed and self.tunnel.conn.can_open


@dataclass(slots=True)
class Want:
    """What a request needs from a node."""

    route: str
    model: str | None = None
    sticky: str | None = None  # the node this browser used before
    exclude: frozenset[NodeSession] = frozenset()
    #: The conversation the request continues (bridge/affinity.py's key of its body), if any.
    conversation: Conversation | None = None


def models_of(value: Any) -> frozenset[str]:
    """The model names a bridge lists (HELLO or STATS ``models``), bounded."""
    if not isinstance(value, list):
        return frozenset()
    return frozenset(m[:128] for m in value[:256] if isinstance(m, str) and m)


def serves(models: frozenset[str], model: str) -> bool:
    """Whether a node serving ``models`` serves ``model`` (Ollama's implicit ``:latest`` tag)."""
    if model in models:
        return True
    base, _, tag = model.partition(":")
    return (not tag and f"{base}:latest" in models) or (tag == "latest" and base in models)


def pick(
    nodes: Sequence[NodeSession],
    want: Want,
    turn: int = 0,
    affinity: Affinity[NodeSession] | None = None,
) -> NodeSession | None:
    """The node for a request: one that serves the route (else any: it answers for itself) and the
    model (where nodes say which they serve), the browser's own node first (sticky), then the node
    that served the conversation's previous turn (``affinity``, unless it is overloaded: see
    bridge/affinity.py), then the one with the fewest open streams; ties go by ``turn``
    (round-robin when the caller counts it up). Closed and draining nodes, nodes that can open no
    more streams and ``want.exclude`` get nothing."""
    live = [s for s in nodes if s.open and s not in want.exclude]
    serving = [s for s in live if want.route in s.routes] or live
    if want.model:
        known = [s for s in serving if serves(s.models, want.model)]
        serving = known or [s for s in serving if not s.models] or serving
    if want.sticky:
        for s in serving:
            if s.node == want.sticky:
                return s
    if not serving:
        return None
    if affinity is not None:
        kept = affinity.keep(want.conversation, serving, _load)
        if kept is not None:
            return kept
    least = min(s.load for s in serving)
    tied = [s for s in serving if s.load == least]
    return tied[turn % len(tied)]


def _load(s: NodeSession) -> int:
    return s.load


class Pool:
    """The nodes connected now. A request calls :meth:`acquire`; a change (a node comes, goes or
    drains, the relay drains) is announced with :meth:`notify` and wakes every waiter."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.sessions: list[NodeSession] = []
        #: Requests waiting for a node to connect.
        self.waiting = 0
        #: The relay is draining: no new requests, waiters give up.
        self.draining = False
        self._changed = asyncio.Condition()
        self._turn = 0
        #: Which node served each conversation's latest turn (bridge/affinity.py).
        self.affinity: Affinity[NodeSession] = Affinity()

    def pick(self, want: Want) -> NodeSession | None:
        self._turn += 1
        session = pick(self.sessions, want, self._turn, self.affinity)
        if session is not None:
            self.affinity.served(want.conversation, session)
        return session

    def live(self) -> list[NodeSession]:
        return [s for s in self.sessions if not s.tunnel.closed and not s.draining]

    async def acquire(self, want: Want) -> NodeSession | None:
        """A node for the request, waiting up to ``grace`` seconds for one to connect."""
        session = self.pick(want)
        if session is not None:
            return session
        deadline = time.monotonic() + self.grace
        self.waiting += 1
        try:
            async with self._changed:
                while (session := self.pick(want)) is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or self.draining:
                        return None
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._changed.wait(), remaining)
                return session
        finally:
            self.waiting -= 1

    async def wait_change(self, timeout: float) -> None:
        """Until the next :meth:`notify`, at most ``timeout`` seconds."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout)

    async def add(self, session: NodeSession) -> None:
        self.sessions.append(session)
        await self.notify()

    async def remove(self, session: NodeSession) -> bool:
        """Forget a node; False when it was not here."""
        if session not in self.sessions:
            return False
        self.sessions.remove(session)
        self.affinity.forget(session)
        await self.notify()
        return True

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()
