"""Bodies the relay reads itself (the login form, a job submission): each has a size limit and a
stall timeout, so that no client holds the relay's memory or a connection with one
(docs/security.md §7, §11 item 6).

:func:`read_small_body` answers 413 from ``Content-Length`` before reading a byte, 413 as a
chunked body passes the limit, and 408 when no byte came for ``idle`` seconds or the whole body
did not come within ``deadline`` seconds; each refusal asks for ``Connection: close``, so the rest
of the body is never read. A body that is forwarded to a
bridge is not read here: it streams under flow control (:mod:`.proxy`)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ..asgi import Receive, Send, json_response
from ..httprules import header


@dataclass(frozen=True, slots=True)
class BodyRefused:
    """Why a body was not read whole: the status (413 or 408) and the client's words."""

    status: int
    error: str


def declared_too_large(headers: list[tuple[str, str]], limit: int) -> bool:
    """Whether the request's ``Content-Length`` already says the body is over ``limit`` bytes (an
    invalid one counts as too large: the relay will not guess where the body ends)."""
    length = header(headers, "content-length")
    if length is None:
        return False
    length = length.strip()
    return not length.isdigit() or int(length) > limit


async def read_small_body(
    headers: list[tuple[str, str]], receive: Receive, limit: int, idle: float, deadline: float = 0.0
) -> bytes | BodyRefused | None:
    """The whole body of a request with these ``headers``, at most ``limit`` bytes, each part
    within ``idle`` seconds of the last (0: no stall limit) and all of it within ``deadline``
    seconds (0: none; a stall limit alone lets a client sending a byte now and then hold the
    connection for as long as it likes); or why not; or None when the client went away."""
    too_large = BodyRefused(413, f"request body exceeds {limit} bytes")
    if declared_too_large(headers, limit):
        return too_large
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline if deadline else None
    parts: list[bytes] = []
    size = 0
    while True:
        wait = idle or None
        if end is not None:
            left = max(0.0, end - loop.time())
            wait = left if wait is None else min(wait, left)
        try:
            message = await asyncio.wait_for(receive(), wait)
        except TimeoutError:
            if end is not None and loop.time() >= end:
                return BodyRefused(408, f"request body too slow: not complete within {deadline:g} s")
            return BodyRefused(408, f"request body stalled: no byte for {idle:g} s")
        if message["type"] == "http.disconnect":
            return None
        part = message.get("body", b"")
        size += len(part)
        if size > limit:
            return too_large
        parts.append(part)
        if not message.get("more_body", False):
            return b"".join(parts)


async def refuse_body(send: Send, refused: BodyRefused) -> None:
    """Answer a body that was not read: its status, and the connection closed after the answer
    (uvicorn ends a connection whose response says ``Connection: close``)."""
    await json_response(send, refused.status, {"error": refused.error}, extra=[(b"connection", b"close")])
