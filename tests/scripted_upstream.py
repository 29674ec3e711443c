"""An upstream whose answers the test writes: a real HTTP and WebSocket server (uvicorn) on loopback
for the security tests (tests/test_security_*.py, tests/conformance/test_security.py).

What a hostile or careless upstream can send is what those tests need to choose: any status, any
response header (``Set-Cookie`` under names that only look like the relay's own, ...), and a refused
WebSocket upgrade with headers of its choosing. Everything else is echoed, so a test sees exactly what
reached the upstream.

* ``GET|POST|... /say?spec=<JSON>``: answers ``spec``: ``{"status": 200, "headers": [[name, value],
  ...], "body": "text"}`` (names and values are sent as Latin-1 bytes).
* WebSocket ``/ws/say?spec=<JSON>``: refuses the upgrade with ``spec``'s status, headers and body.
* WebSocket, any other path: accepts, sends the handshake it saw as one JSON text message
  (``{"path", "raw_path", "headers"}``), then echoes text messages.
* HTTP, any other path: 200 JSON ``{"method", "path", "raw_path", "query", "headers", "body_length"}``.

Run it as ``python -m tests.scripted_upstream --port 0``; it prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def _spec(scope: Scope) -> dict[str, Any]:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    raw = query.get("spec", ["{}"])[-1]
    spec = json.loads(raw)
    return spec if isinstance(spec, dict) else {}


def _head(spec: dict[str, Any]) -> list[tuple[bytes, bytes]]:
    return [(str(k).encode("latin-1"), str(v).encode("latin-1")) for k, v in spec.get("headers", [])]


def _seen(scope: Scope) -> dict[str, Any]:
    return {
        "path": scope["path"],
        "raw_path": (scope.get("raw_path") or b"").decode("latin-1"),
        "query": scope.get("query_string", b"").decode("latin-1"),
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
    }


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
    elif scope["type"] == "websocket":
        await _websocket(scope, receive, send)
    elif scope["type"] == "http":
        await _http(scope, receive, send)


async def _http(scope: Scope, receive: Receive, send: Send) -> None:
    size = 0
    while True:  # read the whole body first (the client may be waiting for its upload to finish)
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["path"] == "/say":
        spec = _spec(scope)
        body = str(spec.get("body", "")).encode()
        headers = _head(spec)
        if not any(k.lower() == b"content-length" for k, _ in headers):
            headers.append((b"content-length", str(len(body)).encode()))
        status = int(spec.get("status", 200))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    data = json.dumps({"method": scope["method"], **_seen(scope), "body_length": size}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


async def _websocket(scope: Scope, receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    if scope["path"] == "/ws/say":
        spec = _spec(scope)
        await send(
            {
                "type": "websocket.http.response.start",
                "status": int(spec.get("status", 403)),
                "headers": _head(spec),
            }
        )
        await send({"type": "websocket.http.response.body", "body": str(spec.get("body", "")).encode()})
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": json.dumps(_seen(scope))})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message.get("text") is not None:
            await send({"type": "websocket.send", "text": message["text"]})


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets:
            print(f"READY {sockets[0].getsockname()[1]}", flush=True)


async def serve(port: int) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", ws="websockets-sansio")
    await _Server(config).serve(sockets=[sock])


def start() -> tuple[Any, str]:
    """Run it as a child process of the test: ``(proc, base URL)`` (a :class:`tests.procs.Proc`)."""
    import sys

    from .procs import Proc

    proc = Proc([sys.executable, "-m", "tests.scripted_upstream", "--port", "0"], "scripted-upstream")
    port = proc.wait_for(r"^READY (\d+)").group(1)
    return proc, f"http://127.0.0.1:{port}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
