"""The benchmark's upstream: a raw ASGI app under uvicorn (one worker, loopback, uvloop + httptools when
installed), so the upstream itself costs as little as possible and the same for every route.

* ``GET /small``            -> about 1 KB of JSON (with Content-Length)
* ``GET /bytes/{n}``        -> ``n`` bytes (Content-Length), streamed in 64 KiB chunks
* ``POST /sink``            -> reads the whole body, answers ``{"bytes": <length>}``
* ``GET /stream?n=N&interval=MS`` -> ``N`` NDJSON lines (``application/x-ndjson``, chunked), one every
  ``MS`` milliseconds, each flushed on its own and stamped with ``time.time_ns()`` just before it is sent
  (``"t":<ns>``), like an Ollama ``/api/generate`` reply.

Run: ``python benchmarks/upstream.py --port 0``; it prints ``upstream listening on http://HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

CHUNK = 64 * 1024
_BLOCK = b"x" * CHUNK
SMALL = json.dumps(
    {
        "model": "bench",
        "created_at": "2026-01-01T00:00:00Z",
        "message": {"role": "assistant", "content": "lorem ipsum dolor sit amet " * 30},
        "done": True,
    }
).encode()


async def _reply(send: Send, status: int, body: bytes, content_type: bytes = b"application/json") -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _bytes(send: Send, n: int) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/octet-stream"),
                (b"content-length", str(n).encode()),
            ],
        }
    )
    left = n
    while left > 0:
        piece = _BLOCK if left >= CHUNK else _BLOCK[:left]
        left -= len(piece)
        await send({"type": "http.response.body", "body": piece, "more_body": left > 0})
    if n == 0:
        await send({"type": "http.response.body", "body": b""})


async def _sink(receive: Receive, send: Send) -> None:
    total = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        total += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    await _reply(send, 200, json.dumps({"bytes": total}).encode())


async def _stream(send: Send, n: int, interval_ms: float) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/x-ndjson")],
        }
    )
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(n):
        if i:
            delay = start + i * interval_ms / 1000 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        line = b'{"model":"bench","i":%d,"response":"tok","done":%s,"t":%d}\n' % (
            i,
            b"true" if i == n - 1 else b"false",
            time.time_ns(),
        )
        await send({"type": "http.response.body", "body": line, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    path: str = scope["path"]
    method: str = scope["method"]
    if method == "GET" and path == "/small":
        await _reply(send, 200, SMALL)
    elif method == "GET" and path.startswith("/bytes/") and path[7:].isdigit():
        await _bytes(send, int(path[7:]))
    elif method == "POST" and path == "/sink":
        await _sink(receive, send)
    elif method == "GET" and path == "/stream":
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        n = int(query.get("n", ["10"])[0])
        interval = float(query.get("interval", ["20"])[0])
        await _stream(send, n, interval)
    else:
        await _reply(send, 404, b'{"error":"not found"}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed)")
    args = parser.parse_args()
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on accepted sockets whose proto is TCP,
    # and an accepted socket inherits the listener's proto (0 for a plain socket(AF_INET, SOCK_STREAM)).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
        server_header=False,
        date_header=False,
        timeout_keep_alive=60,
    )
    server = uvicorn.Server(config)
    print(f"upstream listening on http://{args.host}:{port}", flush=True)
    sys.stdout.flush()
    server.run(sockets=[sock])


if __name__ == "__main__":
    main()
