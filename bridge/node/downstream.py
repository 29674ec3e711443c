"""What the bridge's one forwarding path (:meth:`bridge.node.upstream.Upstreams.forward_http`) is
handed besides the request: the :class:`Downstream` its answer goes to (the tunnel stream, a client
of the local endpoint, or a translating sink of Ollama's API in front of an engine), and the
signature of the path itself (:data:`Forward`) for a caller that is handed the path."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from ..httprules import Headers
from .metering import RequestMeter


class Downstream(Protocol):
    """Where a forwarded response goes: :meth:`start` with the head, :meth:`write` each chunk,
    then :meth:`end`; or :meth:`fail` (a RESET code and a reason for the log) when no answer can be
    given or the body breaks off. A client that went away raises StreamError from these."""

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None: ...
    async def write(self, data: bytes) -> None: ...
    async def end(self) -> None: ...
    async def fail(self, code: int, reason: str) -> None: ...


#: ``forward_http(method, route, target, headers, body, down, meter)``.
Forward = Callable[
    [str, str, str, Headers, AsyncIterator[bytes] | None, Downstream, RequestMeter], Awaitable[None]
]
