"""Client WebSockets (e.g. Open WebUI's socket.io): carried as a stream whose DATA holds WebSocket
records (docs/protocol.md, client WebSockets), on the same forwarding path, auth and routing as HTTP.
A refusal before the handshake is an HTTP response where the server can send one."""

from __future__ import annotations

import contextlib
import json
from typing import Any

from ..asgi import Receive, Scope, Send, client_host, raw_headers, text_headers
from ..errors import ProtocolError, StreamError
from ..httprules import WS_HANDSHAKE, Address, forward_headers, header, response_headers
from ..tunnel.stream import Stream
from ..tunnel.websocket import records, send_close, send_message, splice
from ..wire.constants import WS_BINARY, WS_TEXT
from ..wire.records import decode_ws_close
from .auth import Granted
from .forward import Answer, Forwarder, Request
from .metrics import RelayMetrics
from .pool import Want
from .proxy import sticky_node
from .users import Users


class ClientSockets:
    def __init__(self, forwarder: Forwarder, metrics: RelayMetrics, users: Users | None = None) -> None:
        self.forwarder = forwarder
        self.metrics = metrics
        self.users = users

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        auth: Granted,
        address: Address,
        send_cookies: bool = True,
    ) -> None:
        """A client WebSocket whose ``websocket.connect`` came and whose key was granted
        (``send_cookies``: whether its route receives the browser's cookies, proxy.gets_cookies)."""
        client_headers = text_headers(scope["headers"])
        headers = [
            (k, v)
            for k, v in forward_headers(
                client_headers,
                client=client_host(scope),
                https=scope.get("scheme") in ("https", "wss"),
                prefix=address.prefix,
                drop_bearer=auth.how == "bearer",
                send_cookies=send_cookies,
            )
            if k.lower() not in WS_HANDSHAKE
        ]
        if self.users is not None:
            headers = self.users.headers(headers, address.route, auth.key_id)
        request = Request(
            "GET", address.route, address.target, headers, b"", client_host(scope), websocket=True
        )
        want = Want(address.route, None, sticky_node(client_headers, auth))
        self.metrics.websockets += 1
        try:
            async with self.forwarder.exchange(request, want) as outcome:
                if isinstance(outcome, Answer):
                    await deny(scope, send, outcome.status, outcome.body, list(outcome.headers))
                    return
                head, stream = outcome.head, outcome.stream
                if head.status != 101:
                    body = b""
                    with contextlib.suppress(StreamError):
                        while len(body) < 65536 and (chunk := await stream.read()):
                            body += chunk
                    # The upstream's refusal, its headers through the same filter as any answer's
                    # (the relay's cookies dropped, the others scoped to the route).
                    passed = response_headers(
                        head.status, head.headers, route_prefix=address.prefix, target=address.target
                    )
                    if passed is None:
                        await deny(scope, send, 502, {"error": "invalid answer to the WebSocket upgrade"})
                        return
                    await deny(scope, send, head.status, body, passed)
                    return
                await send(
                    {
                        "type": "websocket.accept",
                        "subprotocol": header(head.headers, "sec-websocket-protocol"),
                    }
                )
                await carry(receive, send, stream)
        finally:
            self.metrics.websockets -= 1


async def deny(
    scope: Scope, send: Send, status: int, body: Any, headers: list[tuple[str, str]] | None = None
) -> None:
    """Refuse a WebSocket handshake with an HTTP response: ``body`` as it is (bytes, with the
    upstream's headers) or as JSON; or close 1008 where the server cannot answer with HTTP."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    if isinstance(body, bytes):
        data = body
        out = raw_headers(
            (k, v) for k, v in headers or [] if k.lower() not in ("content-length", *WS_HANDSHAKE)
        )
    else:
        data = json.dumps(body).encode()
        out = [(b"content-type", b"application/json"), *raw_headers(headers or [])]
    out.append((b"content-length", str(len(data)).encode()))
    await send({"type": "websocket.http.response.start", "status": status, "headers": out})
    await send({"type": "websocket.http.response.body", "body": data})


async def carry(receive: Receive, send: Send, stream: Stream) -> None:
    """Carry messages both ways between the client's WebSocket (ASGI) and the stream's records."""

    async def up() -> None:  # client -> bridge
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                await send_close(stream, int(message.get("code", 1005)), message.get("reason") or "")
                return
            text = message.get("text")
            await send_message(stream, text if text is not None else (message.get("bytes") or b""))

    async def down() -> None:  # bridge -> client
        async for opcode, payload in records(stream):
            if opcode == WS_TEXT:
                await send({"type": "websocket.send", "text": payload.decode("utf-8", "replace")})
            elif opcode == WS_BINARY:
                await send({"type": "websocket.send", "bytes": payload})
            else:
                code, reason = decode_ws_close(payload)
                await send({"type": "websocket.close", "code": sendable_close(code), "reason": reason})
                return
        await send({"type": "websocket.close", "code": 1011, "reason": "upstream ended without closing"})

    async def failed(exc: BaseException) -> None:
        if isinstance(exc, StreamError):
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1011, "reason": "tunnel stream failed"})
        elif isinstance(exc, ProtocolError):
            stream.reset(exc.code, str(exc))
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1002, "reason": "bad message from bridge"})
        elif not isinstance(exc, OSError):
            raise exc

    await splice(up(), down(), failed)


def sendable_close(code: int) -> int:
    """A close code an endpoint may send: 1005 (no status) becomes 1000, 1006 (abnormal) 1011."""
    if code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code < 5000:
        return code
    return 1011 if code in (1006, 1015) else 1000
