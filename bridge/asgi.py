"""The few ASGI pieces the relay and the bridge's local endpoint share: the callable types, headers
as text, a whole request body, and small complete responses (JSON, HTML, a redirect)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
RawHeaders = list[tuple[bytes, bytes]]

#: A key of an ``http.response.start`` message whose body follows at once (the relay's proxy, when
#: the node's first body bytes came with the head): the relay's server then writes the head together
#: with the first body bytes, one socket write instead of two (bridge/relay/server.py). Servers that
#: do not know it ignore it.
HOLD_HEAD = "kaggle_bridge.hold_head"


def text_headers(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """ASGI's header pairs as text (Latin-1, as HTTP/1.1 carries them)."""
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw]


def raw_headers(headers: Iterable[tuple[str, str]]) -> RawHeaders:
    """Header pairs for ASGI; a value beyond Latin-1 (a node's name) gets ``?`` for what it lacks."""
    return [(k.encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers]


def client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else ""


def server_port(scope: Scope) -> int:
    server = scope.get("server")
    return int(server[1]) if server and server[1] is not None else 0


async def read_body(receive: Receive, idle: float = 0.0) -> bytes | None:
    """The whole request body, or None when the client went away. Raises TimeoutError when no
    part of it came for ``idle`` seconds (0: wait for ever)."""
    parts: list[bytes] = []
    while True:
        message = await asyncio.wait_for(receive(), idle or None)
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def respond(send: Send, status: int, headers: RawHeaders, body: bytes = b"") -> None:
    """A complete response (its Content-Length added)."""
    head = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def json_response(send: Send, status: int, body: Any, extra: RawHeaders | None = None) -> None:
    await respond(
        send,
        status,
        [(b"content-type", b"application/json"), (b"cache-control", b"no-store"), *(extra or [])],
        json.dumps(body).encode(),
    )


async def html_response(send: Send, status: int, page: str) -> None:
    """A page of the relay's own: no framing, no scripts, no outside assets."""
    await respond(
        send,
        status,
        [
            (b"content-type", b"text/html; charset=utf-8"),
            (b"cache-control", b"no-store"),
            (b"x-frame-options", b"DENY"),
            (
                b"content-security-policy",
                b"default-src 'none'; style-src 'unsafe-inline'; form-action 'self'",
            ),
        ],
        page.encode(),
    )


async def redirect(send: Send, location: str, extra: RawHeaders | None = None) -> None:
    """303 See Other to ``location``."""
    await respond(send, 303, [(b"location", location.encode("latin-1")), *(extra or [])])
