"""Upstream HTTP servers for the tests: a real server (uvicorn) on loopback.

STAND-IN: the ``/api/*`` and ``/v1/*`` endpoints imitate Ollama's REST API and its OpenAI-compatible
API closely enough for the real ``ollama`` and ``openai`` clients (NDJSON and SSE streaming, the
Host/Origin checks that make Ollama answer 403 to a foreign Host). Ollama's own binary cannot run
here; the real engine path (llama.cpp) is tested where it is built. The other endpoints are plain
test fixtures: an echo that streams the request body back as it arrives, large bodies, slow
streams, status codes and a request that never answers.

Run it as ``python -m tests.upstreams --port 0``; it prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MODEL = "tiny:latest"
#: The stand-in's canned reply, one token per word.
REPLY = "Hello from the stand-in engine , streamed token by token ."
TOKEN_DELAY = 0.05
#: Seconds a model stays listed in ``/api/ps`` after its last generation (Ollama's default keep_alive).
KEEP_ALIVE = 300
ALLOWED_HOSTS = {"127.0.0.1", "localhost", "[::1]"}


def _query(scope: Scope) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}


def _headers(scope: Scope) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in scope["headers"]:
        name = k.decode("latin-1").lower()
        out[name] = out[name] + ", " + v.decode("latin-1") if name in out else v.decode("latin-1")
    return out


async def _start(send: Send, status: int, ctype: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [(b"content-type", ctype.encode()), *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})


async def _body(send: Send, data: bytes, more: bool = False) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": more})


async def _json(send: Send, status: int, obj: Any) -> None:
    await _start(send, status, "application/json")
    await _body(send, json.dumps(obj).encode())


async def _read_all(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionError("client went away")
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def _foreign(headers: dict[str, str]) -> str | None:
    """Ollama's checks: a Host that is not loopback, or an Origin it does not allow -> 403."""
    host = headers.get("host", "")
    hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    if hostname not in ALLOWED_HOSTS:
        return f"host {host!r} not allowed"
    origin = headers.get("origin")
    if origin is not None:
        o = urlsplit(origin)
        if o.scheme not in ("http", "https") or (o.hostname or "") not in {"127.0.0.1", "localhost", "::1"}:
            return f"origin {origin!r} not allowed"
    return None


class Upstream:
    """The ASGI app. ``token_delay`` spaces the stand-in engine's tokens."""

    def __init__(self, token_delay: float = TOKEN_DELAY) -> None:
        self.token_delay = token_delay
        self.generations = 0
        self.last_used = 0.0  # time.time() of the last generation: the model stays "loaded" after it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        method: str = scope["method"]
        headers = _headers(scope)
        if path.startswith(("/api/", "/v1/")) or path == "/":
            denied = _foreign(headers)
            if denied:
                await _start(send, 403, "text/plain")
                await _body(send, denied.encode())
                return
        try:
            await self._route(scope, receive, send, method, path, headers)
        except ConnectionError:
            return

    async def _route(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str, headers: dict[str, str]
    ) -> None:
        q = _query(scope)
        if path == "/_counts":  # for tests: how many generations this engine ran
            await _json(send, 200, {"generations": self.generations})
        elif path == "/":
            await _start(send, 200, "text/plain; charset=utf-8")
            await _body(send, b"Ollama is running")
        elif path == "/api/version":
            await _json(send, 200, {"version": "0.12.0-standin"})
        elif path == "/api/tags":
            await _json(send, 200, {"models": [_model_entry()]})
        elif path == "/api/ps":
            await _json(send, 200, {"models": self._loaded()})
        elif path == "/api/show" and method == "POST":
            await self._show(receive, send)
        elif path in ("/api/chat", "/api/generate") and method == "POST":
            await self._ollama(receive, send, path)
        elif path == "/v1/models":
            await _json(
                send,
                200,
                {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "library"}]},
            )
        elif path == "/v1/chat/completions" and method == "POST":
            await self._openai(receive, send)
        elif path == "/small":
            await _json(send, 200, {"ok": True, "pad": "x" * 900})
        elif path == "/headers":
            body = await _read_all(receive)
            await _json(
                send,
                200,
                {
                    "method": method,
                    "path": path,
                    "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                    "query": scope.get("query_string", b"").decode("latin-1"),
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                    "body_length": len(body),
                },
            )
        elif path == "/sha256" and method == "POST":
            digest, size = hashlib.sha256(), 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                digest.update(message.get("body", b""))
                size += len(message.get("body", b""))
                if not message.get("more_body"):
                    break
            await _json(send, 200, {"sha256": digest.hexdigest(), "length": size})
        elif path == "/echo":
            await self._echo(receive, send, headers)
        elif path.startswith("/bytes/"):
            await self._bytes(send, int(path.split("/")[2]))
        elif path == "/stream":
            await self._stream(send, int(q.get("n", "10")), float(q.get("interval", "0.05")))
        elif path == "/sse":
            await self._sse(send, int(q.get("n", "5")), float(q.get("interval", "0.05")))
        elif path.startswith("/status/"):
            await _start(send, int(path.split("/")[2]), "text/plain")
            await _body(send, b"status " + path.split("/")[2].encode())
        elif path == "/hang":
            if q.get("head") == "1":
                await _start(send, 200, "text/plain")
                await _body(send, b"partial", more=True)
            await asyncio.Event().wait()
        elif path == "/die":
            # Headers and part of a body, then the upstream process dies without finishing.
            await _start(send, 200, "text/plain", [(b"content-length", b"1000")])
            await _body(send, b"x" * 100, more=True)
            await asyncio.sleep(0.05)
            import os

            os._exit(3)
        else:
            await _json(send, 404, {"error": "not found", "path": path})

    # ---------------------------------------------------------------- stand-in engine (Ollama-like)
    async def _ollama(self, receive: Receive, send: Send, path: str) -> None:
        try:
            req = json.loads(await _read_all(receive) or b"{}")
        except json.JSONDecodeError:
            await _json(send, 400, {"error": "invalid JSON"})
            return
        if req.get("model") not in (MODEL, MODEL.split(":")[0]):
            await _json(send, 404, {"error": f"model '{req.get('model')}' not found"})
            return
        self.generations += 1
        self.last_used = time.time()
        chat = path == "/api/chat"
        tokens = REPLY.split(" ")
        limit = (req.get("options") or {}).get("num_predict")  # honoured, as Ollama does
        if isinstance(limit, int) and limit > 0:
            tokens = (tokens * (limit // len(tokens) + 1))[:limit]
        prompt_words = len(str(req.get("prompt", "")).split()) + sum(
            len(str(m.get("content", "")).split()) for m in req.get("messages") or [] if isinstance(m, dict)
        )
        start = time.time_ns()

        def piece(text: str) -> dict[str, Any]:
            base: dict[str, Any] = {"model": req["model"], "created_at": _now_iso()}
            if chat:
                base["message"] = {"role": "assistant", "content": text}
            else:
                base["response"] = text
            return base

        def final() -> dict[str, Any]:
            total = time.time_ns() - start
            out = piece("")
            out.update(
                done=True,
                done_reason="stop",
                total_duration=total,
                load_duration=1000,
                prompt_eval_count=max(1, prompt_words),  # stand-in: one token a word
                prompt_eval_duration=2_000_000,
                eval_count=len(tokens),
                eval_duration=max(1, total - 2_000_000),
            )
            return out

        if req.get("stream", True) is False:
            await asyncio.sleep(self.token_delay * len(tokens))
            out = piece(" ".join(tokens))
            full = final()
            full.pop("message", None)
            full.pop("response", None)
            out.update({k: v for k, v in full.items() if k not in out})
            await _json(send, 200, out)
            return
        await _start(send, 200, "application/x-ndjson")
        for i, tok in enumerate(tokens):
            await asyncio.sleep(self.token_delay)
            line = piece(tok if i == 0 else " " + tok)
            line["done"] = False
            line["sent_ns"] = time.time_ns()  # stand-in extra: when the token left the upstream
            await _body(send, json.dumps(line).encode() + b"\n", more=True)
        await _body(send, json.dumps(final()).encode() + b"\n")

    def _loaded(self) -> list[dict[str, Any]]:
        """``/api/ps``: like Ollama, a model counts as loaded for ``KEEP_ALIVE`` after its last use."""
        if not self.last_used or time.time() > self.last_used + KEEP_ALIVE:
            return []
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.last_used + KEEP_ALIVE))
        entry = _model_entry()
        entry.pop("modified_at")
        return [{**entry, "expires_at": expires, "size_vram": entry["size"]}]

    async def _show(self, receive: Receive, send: Send) -> None:
        """``/api/show``: a model's details (Open WebUI asks for them)."""
        try:
            req = json.loads(await _read_all(receive) or b"{}")
        except json.JSONDecodeError:
            await _json(send, 400, {"error": "invalid JSON"})
            return
        name = req.get("model") or req.get("name")
        if name not in (MODEL, MODEL.split(":")[0]):
            await _json(send, 404, {"error": f"model '{name}' not found"})
            return
        await _json(
            send,
            200,
            {
                "modelfile": f"FROM {MODEL}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _model_entry()["details"],
                "model_info": {"general.architecture": "llama", "general.parameter_count": 1_000_000},
                "capabilities": ["completion"],
                "modified_at": _model_entry()["modified_at"],
            },
        )

    async def _openai(self, receive: Receive, send: Send) -> None:
        req = json.loads(await _read_all(receive) or b"{}")
        self.generations += 1
        tokens = REPLY.split(" ")
        cid = f"chatcmpl-{self.generations}"
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.get("model", MODEL),
                "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        if not req.get("stream"):
            await asyncio.sleep(self.token_delay * len(tokens))
            await _json(
                send,
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": req.get("model", MODEL),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": " ".join(tokens)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {
                        "prompt_tokens": 7,
                        "completion_tokens": len(tokens),
                        "total_tokens": 7 + len(tokens),
                    },
                },
            )
            return
        await _start(send, 200, "text/event-stream")
        first = chunk({"role": "assistant", "content": ""}, None)
        await _body(send, b"data: " + json.dumps(first).encode() + b"\n\n", more=True)
        for i, tok in enumerate(tokens):
            await asyncio.sleep(self.token_delay)
            c = chunk({"content": tok if i == 0 else " " + tok}, None)
            c["sent_ns"] = time.time_ns()
            await _body(send, b"data: " + json.dumps(c).encode() + b"\n\n", more=True)
        await _body(send, b"data: " + json.dumps(chunk({}, "stop")).encode() + b"\n\n", more=True)
        await _body(send, b"data: [DONE]\n\n")

    # ---------------------------------------------------------------- WebSockets
    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/ws/echo``: echoes text and binary, picks the subprotocol ``chat`` if offered, reports
        the handshake headers on ``headers?``, closes with 4001 on ``close-me``.
        ``/ws/ticks?n=N&interval=S``: pushes N stamped messages, then closes 1000.
        ``/ws/deny``: refuses the handshake with 403."""
        await receive()  # websocket.connect
        path = scope["path"]
        headers = _headers(scope)
        if path == "/ws/deny" or _foreign(headers):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"text/plain"), (b"x-denied", b"yes")],
                }
            )
            await send({"type": "websocket.http.response.body", "body": b"denied: " + path.encode()})
            return
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": "chat" if "chat" in offered else None})
        if path == "/ws/ticks":
            q = _query(scope)
            for i in range(int(q.get("n", "5"))):
                await asyncio.sleep(float(q.get("interval", "0.05")))
                await send(
                    {"type": "websocket.send", "text": json.dumps({"i": i, "sent_ns": time.time_ns()})}
                )
            await send({"type": "websocket.close", "code": 1000, "reason": "done"})
            return
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text == "close-me":
                await send({"type": "websocket.close", "code": 4001, "reason": "asked to"})
                return
            if text == "headers?":
                await send({"type": "websocket.send", "text": json.dumps(headers)})
            elif text is not None:
                await send({"type": "websocket.send", "text": text})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})

    # ---------------------------------------------------------------- plain fixtures
    async def _echo(self, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        """Stream the request body back as it arrives (no buffering), with its content type."""
        await _start(send, 200, headers.get("content-type", "application/octet-stream"))
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            more = bool(message.get("more_body"))
            if body or not more:
                await _body(send, body, more=more)
            if not more:
                return

    async def _bytes(self, send: Send, n: int) -> None:
        await _start(send, 200, "application/octet-stream", [(b"content-length", str(n).encode())])
        block = bytes(range(256)) * 256  # 64 KiB, a known pattern
        left = n
        while left > 0:
            part = block[: min(left, len(block))]
            left -= len(part)
            await _body(send, part, more=left > 0)
        if n == 0:
            await _body(send, b"")

    async def _stream(self, send: Send, n: int, interval: float) -> None:
        await _start(send, 200, "application/x-ndjson")
        for i in range(n):
            await asyncio.sleep(interval)
            line = json.dumps({"i": i, "sent_ns": time.time_ns()}).encode() + b"\n"
            await _body(send, line, more=i < n - 1)
        if n == 0:
            await _body(send, b"")

    async def _sse(self, send: Send, n: int, interval: float) -> None:
        await _start(send, 200, "text/event-stream", [(b"cache-control", b"no-cache")])
        for i in range(n):
            await asyncio.sleep(interval)
            data = json.dumps({"i": i, "sent_ns": time.time_ns()})
            await _body(send, f"id: {i}\ndata: {data}\n\n".encode(), more=True)
        await _body(send, b"data: [DONE]\n\n")


def _model_entry() -> dict[str, Any]:
    return {
        "name": MODEL,
        "model": MODEL,
        "modified_at": "2026-11-01T00:00:00Z",
        "size": 1234,
        "digest": "0" * 64,
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": "llama",
            "families": ["llama"],
            "parameter_size": "1M",
            "quantization_level": "F32",
        },
    }


def _now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


class _Server(uvicorn.Server):
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if sockets:
            print(f"READY {sockets[0].getsockname()[1]}", flush=True)


async def serve(port: int, token_delay: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(
        Upstream(token_delay), log_level="warning", access_log=False, lifespan="on", ws="websockets-sansio"
    )
    await _Server(config).serve(sockets=[sock])


def _set_model(name: str) -> None:
    global MODEL
    MODEL = name


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=TOKEN_DELAY)
    parser.add_argument("--model", default=MODEL, help="the one model this stand-in serves")
    args = parser.parse_args(argv)
    _set_model(args.model)
    asyncio.run(serve(args.port, args.token_delay))


if __name__ == "__main__":
    main()
