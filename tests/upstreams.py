"""The one stand-in of Ollama, and the upstream of the tests and benchmarks: a real HTTP server
(uvicorn) on loopback.

STAND-IN for Ollama, which cannot run here (its release download, a GPU): its REST API and its
OpenAI-compatible API closely enough for the real ``ollama`` and ``openai`` clients, Open WebUI
and deployment/ (checked against Ollama's server/routes.go and api/types.go): NDJSON and SSE
streaming; ``options.num_predict`` (or ``max_tokens``) cutting a reply with ``done_reason``
"length"; ``/api/generate`` with an empty prompt loading the model (``done_reason`` "load");
``/api/ps`` listing the models loaded until their ``keep_alive`` (``OLLAMA_KEEP_ALIVE``, -1: for
ever); ``/api/pull`` streaming its progress; ``/api/show`` with the model's shape; the Host and
Origin checks that make Ollama answer 403 to a foreign Host. Every Ollama answer carries
``X-Standin-Ollama: <port> gpu=<CUDA_VISIBLE_DEVICES> spread=<OLLAMA_SCHED_SPREAD>`` so a test can
tell replicas apart. The real engine path (llama.cpp) is tested where it is built.

Two ways to run it:

* ``python -m tests.upstreams --port 0`` (tests/procs.py ``start_upstream``, the benchmarks): it
  prints ``READY <port>``; it serves one model (``--model``, ``tiny:latest``) whose reply is
  :data:`REPLY`, and plain fixtures besides: an echo that streams the request body back as it
  arrives, large bodies, a sink, slow streams (NDJSON, SSE), status codes, a request that never
  answers, an upstream that dies, WebSockets. A stream (``/stream``, ``/sse``, ``/ws/ticks``) given
  ``gate=NAME`` writes its first item at once and each next one only after a ``POST /gate/NAME``:
  a test reads an item through the relay, then releases the next, so an item held back anywhere on
  the way shows as a read that never completes (order, not a time limit).
* as the ``ollama`` executable (tests/standin/ollama runs ``python -m tests.upstreams ollama ...``):
  ``ollama --version``, ``ollama serve`` (address from ``OLLAMA_HOST``, models pulled into
  ``OLLAMA_MODELS``), ``ollama pull NAME``, ``ollama list``; its replies are numbered words
  ``w0 w1 ...``, one every ``STANDIN_TOKEN_DELAY`` seconds (0.02); a pull takes 14 steps of
  ``STANDIN_PULL_DELAY`` seconds (0.01) and leaves no model behind when it is cut.

GPU or CPU, as the real one decides it (ollama/ollama at v0.20.0): at start ``ollama serve`` logs
one ``msg="inference compute"`` line per GPU it will use (``discover/types.go`` ``LogDetails``: id,
filter_id, library, compute, name, description, libdirs, driver, pci_id, type, total, available),
or a single ``library=cpu`` line when it finds none; ``/api/ps`` then reports ``size_vram`` equal to
``size`` (all in VRAM) or 0 (fields of ``ProcessModelResponse``, ``api/types.go``). The GPUs are
``STANDIN_GPUS`` (as for the stand-in nvidia-smi) filtered by ``CUDA_VISIBLE_DEVICES``; a driver
older than 531 (``STANDIN_DRIVER``, default 550.90.07) gives none, as Ollama's CUDA libraries do
not load there ("driver version 531 and newer", docs/gpu.mdx; the silent CPU fallback of ollama
#12770). ``python -m tests.upstreams`` always reports its model in VRAM.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import socket
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import uvicorn

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The Ollama release the stand-in answers as (deployment/ollama_setup.py pins the same).
VERSION = "0.20.0"
MODEL = "tiny:latest"
#: The reply of ``python -m tests.upstreams``, one token per word.
REPLY = "Hello from the stand-in engine , streamed token by token ."
TOKEN_DELAY = 0.05
#: Seconds a model stays listed in ``/api/ps`` after its last use (Ollama's default keep_alive).
KEEP_ALIVE = 300
ALLOWED_HOSTS = {"127.0.0.1", "localhost", "[::1]"}
#: What /api/show answers for a family (Qwen3-8B's real shape), and for others (a small shape).
SHAPES: dict[str, dict[str, Any]] = {
    "qwen3": {
        "general.architecture": "qwen3",
        "qwen3.block_count": 36,
        "qwen3.attention.head_count": 32,
        "qwen3.attention.head_count_kv": 8,
        "qwen3.attention.key_length": 128,
        "qwen3.embedding_length": 4096,
    },
}
SMALL_SHAPE = {
    "general.architecture": "llama",
    "general.parameter_count": 1_000_000,
    "llama.block_count": 2,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 4,
    "llama.embedding_length": 64,
}
SIZES = {"qwen3:8b": 5_027_784_512}


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


def _words(reply: str | None, body: dict[str, Any]) -> tuple[list[str], bool]:
    """The reply's tokens and whether a limit (``options.num_predict``, ``max_tokens``) cut it:
    the words of ``reply`` (repeated to the limit), or numbered words ``w0 w1 ...`` (8 unless
    limited) when there is no reply sentence."""
    options = body.get("options")
    limit = (options.get("num_predict") if isinstance(options, dict) else None) or body.get("max_tokens")
    limit = limit if isinstance(limit, int) and limit > 0 else None
    if reply is None:
        return [f"w{i}" for i in range(limit or 8)], limit is not None
    words = reply.split(" ")
    if limit is None:
        return words, False
    return (words * (limit // len(words) + 1))[:limit], True


class Models:
    """The models the stand-in serves: the fixed one (``--model``) and those pulled into
    ``models_dir``; which are loaded, until when."""

    def __init__(
        self, fixed: str | None, models_dir: Path | None, keep_alive: float, *, on_gpu: bool = True
    ) -> None:
        self.fixed = fixed
        self.models_dir = models_dir
        self.keep_alive = keep_alive
        self.on_gpu = on_gpu  # where /api/ps says a loaded model lives (size_vram: size or 0)
        self.last_used: dict[str, float] = {}

    def _manifest(self, name: str) -> Path | None:
        if self.models_dir is None:
            return None
        return self.models_dir / "standin-manifests" / name.replace(":", "@").replace("/", "_")

    def entries(self) -> list[dict[str, Any]]:
        out = [_fixed_entry(self.fixed)] if self.fixed else []
        folder = self.models_dir / "standin-manifests" if self.models_dir else None
        for f in sorted(folder.glob("*")) if folder is not None and folder.exists() else []:
            out.append(json.loads(f.read_text()))
        return out

    def find(self, name: str) -> str | None:
        """The model's full name when served (``tiny`` is ``tiny:latest``), else None."""
        for entry in self.entries():
            if name in (entry["name"], entry["name"].removesuffix(":latest")):
                return str(entry["name"])
        return None

    def pulled(self, name: str, size: int, digest: str) -> None:
        path = self._manifest(name)
        entry = {
            "name": name,
            "model": name,
            "modified_at": _now_iso(),
            "size": size,
            "digest": digest,
            "details": {"family": name.split(":")[0], "format": "gguf", "quantization_level": "Q4_K_M"},
        }
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(entry))

    def used(self, name: str) -> None:
        self.last_used[name] = time.time()

    def loaded(self) -> list[dict[str, Any]]:
        """``/api/ps``: a model counts as loaded for ``keep_alive`` seconds after its last use."""
        out = []
        for entry in self.entries():
            used = self.last_used.get(entry["name"])
            if used is None or (self.keep_alive >= 0 and time.time() > used + self.keep_alive):
                continue
            if self.keep_alive < 0:
                expires = "2318-01-01T00:00:00Z"
            else:
                expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(used + self.keep_alive))
            fields = {k: v for k, v in entry.items() if k != "modified_at"}
            out.append({**fields, "expires_at": expires, "size_vram": entry["size"] if self.on_gpu else 0})
        return out


class Upstream:
    """The ASGI app. ``token_delay`` spaces the generated tokens; ``reply`` is the sentence every
    generation answers (None: numbered words)."""

    def __init__(
        self,
        token_delay: float = TOKEN_DELAY,
        *,
        models: Models | None = None,
        reply: str | None = REPLY,
        tag: str = "",
        pull_delay: float = 0.01,
    ) -> None:
        self.token_delay = token_delay
        self.pull_delay = pull_delay
        self.models = models or Models(MODEL, None, KEEP_ALIVE)
        self.reply = reply
        self.tag = tag.encode()
        self.generations = 0
        #: ``/hang`` requests whose client (the bridge) closed the connection: it stopped waiting.
        self.hangs_left = 0
        self.gates: dict[str, asyncio.Semaphore] = {}

    def _gate(self, name: str) -> asyncio.Semaphore:
        return self.gates.setdefault(name, asyncio.Semaphore(0))

    async def _next_item(self, i: int, gate: str, interval: float) -> None:
        """Before item ``i`` of a slow stream: wait ``interval`` or, gated, for a release (item 0
        goes at once)."""
        if not gate:
            await asyncio.sleep(interval)
        elif i:
            await self._gate(gate).acquire()

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
        try:
            if path.startswith(("/api/", "/v1/")) or path == "/":
                denied = _foreign(headers)
                if denied:
                    await _start(send, 403, "text/plain")
                    await _body(send, denied.encode())
                    return
                await self._ollama(receive, self._tagged(send), method, path)
                return
            await self._route(scope, receive, send, method, path, headers)
        except ConnectionError:
            return

    def _tagged(self, send: Send) -> Send:
        """``send`` with the X-Standin-Ollama header on the response head."""

        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start" and self.tag:
                message = {**message, "headers": [*message["headers"], (b"x-standin-ollama", self.tag)]}
            await send(message)

        return tagged

    # ---------------------------------------------------------------- stand-in Ollama
    async def _ollama(self, receive: Receive, send: Send, method: str, path: str) -> None:
        if path == "/":
            await _start(send, 200, "text/plain; charset=utf-8")
            await _body(send, b"Ollama is running")
        elif path == "/api/version":
            await _json(send, 200, {"version": f"{VERSION}-standin"})
        elif path == "/api/tags":
            await _json(send, 200, {"models": self.models.entries()})
        elif path == "/api/ps":
            await _json(send, 200, {"models": self.models.loaded()})
        elif path == "/v1/models":
            data = [
                {"id": m["name"], "object": "model", "owned_by": "library"} for m in self.models.entries()
            ]
            await _json(send, 200, {"object": "list", "data": data})
        elif method != "POST" or path not in (
            "/api/pull",
            "/api/show",
            "/api/chat",
            "/api/generate",
            "/v1/chat/completions",
        ):
            await _json(send, 404, {"error": "not found", "path": path})
        else:
            try:
                req = json.loads(await _read_all(receive) or b"{}")
            except json.JSONDecodeError:
                await _json(send, 400, {"error": "invalid JSON"})
                return
            asked = str(req.get("model") or req.get("name") or "")
            if path == "/api/pull":
                await self._pull(receive, send, asked, req.get("stream", True) is not False)
                return
            model = self.models.find(asked)
            if model is None:
                await _json(send, 404, {"error": f"model '{asked}' not found"})
            elif path == "/api/show":
                await self._show(send, model)
            elif path == "/v1/chat/completions":
                await self._openai(send, model, req)
            else:
                await self._generate(send, model, req, chat=path == "/api/chat")

    async def _generate(self, send: Send, model: str, req: dict[str, Any], *, chat: bool) -> None:
        self.models.used(model)
        if not chat and not req.get("prompt") and not req.get("images"):
            # Ollama loads the model and answers at once (server/routes.go, GenerateHandler).
            await _json(
                send,
                200,
                {
                    "model": req["model"],
                    "created_at": _now_iso(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                },
            )
            return
        self.generations += 1
        tokens, cut = _words(self.reply, req)
        prompt_words = len(str(req.get("prompt", "")).split()) + sum(
            len(str(m.get("content", "")).split()) for m in req.get("messages") or [] if isinstance(m, dict)
        )
        # Durations on the monotonic clock, as Ollama's time.Since (Go's monotonic reading): the
        # wall clock may be slewed, and a duration on it can come out longer than the bridge's.
        start = time.monotonic_ns()

        def piece(text: str) -> dict[str, Any]:
            base: dict[str, Any] = {"model": req["model"], "created_at": _now_iso()}
            if chat:
                base["message"] = {"role": "assistant", "content": text}
            else:
                base["response"] = text
            return base

        def final() -> dict[str, Any]:
            total = time.monotonic_ns() - start
            out = piece("")
            out.update(
                done=True,
                done_reason="length" if cut else "stop",
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

    async def _openai(self, send: Send, model: str, req: dict[str, Any]) -> None:
        self.models.used(model)
        self.generations += 1
        tokens, cut = _words(self.reply, req)
        cid = f"chatcmpl-{self.generations}"
        created = int(time.time())
        finish = "length" if cut else "stop"

        def chunk(delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": req.get("model", model),
                "system_fingerprint": "fp_standin",
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason}],
            }

        if not req.get("stream"):
            await asyncio.sleep(self.token_delay * len(tokens))
            message = {"role": "assistant", "content": " ".join(tokens)}
            usage = {"prompt_tokens": 7, "completion_tokens": len(tokens), "total_tokens": 7 + len(tokens)}
            await _json(
                send,
                200,
                {
                    "id": cid,
                    "object": "chat.completion",
                    "created": created,
                    "model": req.get("model", model),
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": usage,
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
        await _body(send, b"data: " + json.dumps(chunk({}, finish)).encode() + b"\n\n", more=True)
        await _body(send, b"data: [DONE]\n\n")

    async def _show(self, send: Send, model: str) -> None:
        """``/api/show``: a model's details and shape (Open WebUI and the deployment ask)."""
        entry = next(m for m in self.models.entries() if m["name"] == model)
        family = model.split(":")[0]
        await _json(
            send,
            200,
            {
                "modelfile": f"FROM {model}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": entry.get("details", {"family": family}),
                "model_info": SHAPES.get(family, SMALL_SHAPE),
                "capabilities": ["completion"],
                "modified_at": entry.get("modified_at", _now_iso()),
            },
        )

    async def _pull(self, receive: Receive, send: Send, model: str, stream: bool) -> None:
        """``/api/pull``: the layers' progress, then the model is served; its manifest is written at
        "writing manifest", so a pull cut before that leaves no model behind (as the real one)."""
        total = SIZES.get(model, 8 << 20)
        digest = "sha256:" + (model.encode().hex() * 8)[:64]
        steps: list[dict[str, Any]] = [{"status": "pulling manifest"}]
        steps += [
            {
                "status": f"pulling {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total * k // 10,
            }
            for k in range(11)
        ]
        steps += [
            {"status": "verifying sha256 digest"},
            {"status": "writing manifest"},
            {"status": "success"},
        ]
        if not stream:
            self.models.pulled(model, total, digest)
            await _json(send, 200, {"status": "success"})
            return
        # uvicorn drops what is sent after the client left: watch for it to stop as the real one does
        gone = asyncio.ensure_future(receive())
        try:
            await _start(send, 200, "application/x-ndjson")
            for step in steps:
                if gone.done():
                    return
                if step["status"] == "writing manifest":
                    self.models.pulled(model, total, digest)
                await _body(send, json.dumps(step).encode() + b"\n", more=True)
                await asyncio.sleep(self.pull_delay)
            await _body(send, b"")
        finally:
            gone.cancel()

    # ---------------------------------------------------------------- plain fixtures
    async def _route(
        self, scope: Scope, receive: Receive, send: Send, method: str, path: str, headers: dict[str, str]
    ) -> None:
        q = _query(scope)
        if path == "/_counts":  # for tests: how many generations this engine ran, /hang's left
            await _json(send, 200, {"generations": self.generations, "hangs_left": self.hangs_left})
        elif path == "/small":
            await _json(send, 200, {"ok": True, "pad": "x" * 900})
        elif path == "/sink" and method == "POST":
            await self._sink(receive, send)
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
            await self._stream(
                send, int(q.get("n", "10")), float(q.get("interval", "0.05")), q.get("gate", "")
            )
        elif path == "/sse":
            await self._sse(send, int(q.get("n", "5")), float(q.get("interval", "0.05")), q.get("gate", ""))
        elif path.startswith("/gate/") and method == "POST":
            self._gate(path.split("/")[2]).release()
            await _json(send, 200, {"released": path.split("/")[2]})
        elif path.startswith("/status/"):
            await _start(send, int(path.split("/")[2]), "text/plain")
            await _body(send, b"status " + path.split("/")[2].encode())
        elif path == "/hang":
            if q.get("head") == "1":
                await _start(send, 200, "text/plain")
                await _body(send, b"partial", more=True)
            while (await receive())["type"] != "http.disconnect":  # no answer until the client leaves
                pass
            self.hangs_left += 1
        elif path == "/die":
            # Headers and part of a body, then the upstream process dies without finishing.
            await _start(send, 200, "text/plain", [(b"content-length", b"1000")])
            await _body(send, b"x" * 100, more=True)
            await asyncio.sleep(0.05)
            import os

            os._exit(3)
        else:
            await _json(send, 404, {"error": "not found", "path": path})

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
                await self._next_item(i, q.get("gate", ""), float(q.get("interval", "0.05")))
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

    async def _stream(self, send: Send, n: int, interval: float, gate: str = "") -> None:
        """``n`` NDJSON lines, one every ``interval`` seconds on a fixed schedule (no drift) or
        released one by one (``gate``), each stamped with ``time.time_ns()`` just before it is
        written (``"sent_ns"``)."""
        await _start(send, 200, "application/x-ndjson")
        loop = asyncio.get_running_loop()
        start = loop.time()
        for i in range(n):
            if gate:
                await self._next_item(i, gate, interval)
            else:
                await asyncio.sleep(max(0.0, start + (i + 1) * interval - loop.time()))
            line = json.dumps({"i": i, "sent_ns": time.time_ns()}).encode() + b"\n"
            await _body(send, line, more=i < n - 1)
        if n == 0:
            await _body(send, b"")

    async def _sink(self, receive: Receive, send: Send) -> None:
        """Read the whole body, answer its length (the benchmark's upload, nothing computed)."""
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            total += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await _json(send, 200, {"bytes": total})

    async def _sse(self, send: Send, n: int, interval: float, gate: str = "") -> None:
        await _start(send, 200, "text/event-stream", [(b"cache-control", b"no-cache")])
        for i in range(n):
            await self._next_item(i, gate, interval)
            data = json.dumps({"i": i, "sent_ns": time.time_ns()})
            await _body(send, f"id: {i}\ndata: {data}\n\n".encode(), more=True)
        await _body(send, b"data: [DONE]\n\n")


def _fixed_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
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


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(
        socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP
    )  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


async def _serve(app: Upstream, sock: socket.socket, ready: str) -> None:
    """Serve ``app`` on ``sock``; print ``ready`` once listening."""

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            print(ready, flush=True)

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        lifespan="on",
        ws="websockets-sansio",
        backlog=4096,
        timeout_keep_alive=60,
        server_header=False,
        date_header=False,
    )
    await Server(config).serve(sockets=[sock])


# ---------------------------------------------------------------- the ``ollama`` executable
def _ollama_host() -> tuple[str, int]:
    host = os.environ.get("OLLAMA_HOST", "127.0.0.1:11434").removeprefix("http://")
    name, _, port = host.rpartition(":")
    return name or "127.0.0.1", int(port or 11434)


def _gpus() -> list[tuple[int, int]]:
    """(index, total MiB) of the GPUs ``ollama serve`` would use (none with an old driver)."""
    spec = os.environ.get("STANDIN_GPUS", "")
    driver = os.environ.get("STANDIN_DRIVER", "550.90.07")
    if not spec or int(driver.split(".")[0]) < 531:
        return []
    gpus = [(i, int(item.partition("/")[0])) for i, item in enumerate(spec.split(","))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        wanted = {int(x) for x in visible.split(",") if x.strip().isdigit()}
        gpus = [g for g in gpus if g[0] in wanted]
    return gpus


def _device_lines(gpus: list[tuple[int, int]]) -> list[str]:
    """The ``inference compute`` lines of a real v0.20.0 start (slog's text format)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
    head = f'time={now} level=INFO source=types.go:42 msg="inference compute"'
    driver = os.environ.get("STANDIN_DRIVER", "550.90.07")
    cuda = "12.8" if int(driver.split(".")[0]) >= 570 else "12.4"
    lines = [
        f'{head} id=GPU-standin-{index} filter_id="" library=CUDA compute=7.5 name=CUDA{index} '
        f'description="Tesla T4" libdirs=ollama,cuda_v12 driver={cuda} pci_id=0000:00:0{4 + index}.0 '
        f'type=discrete total="{total / 1024:.1f} GiB" available="{total / 1024 - 0.4:.1f} GiB"'
        for index, total in gpus
    ]
    if not gpus:
        lines.append(
            f'{head} id=cpu library=cpu compute="" name=cpu description=cpu libdirs=ollama driver="" '
            'pci_id="" type="" total="31.3 GiB" available="30.4 GiB"'
        )
    return lines


def _ollama_serve() -> int:
    env = os.environ
    host, port = _ollama_host()
    sock = _bind(host, port)
    port = sock.getsockname()[1]
    keep = env.get("OLLAMA_KEEP_ALIVE", "")
    models_dir = Path(env.get("OLLAMA_MODELS", Path.home() / ".ollama" / "models"))
    gpus = _gpus()
    app = Upstream(
        float(env.get("STANDIN_TOKEN_DELAY", "0.02")),
        models=Models(None, models_dir, -1 if keep.startswith("-") else KEEP_ALIVE, on_gpu=bool(gpus)),
        reply=None,
        tag=f"{port} gpu={env.get('CUDA_VISIBLE_DEVICES', 'all')} "
        f"spread={env.get('OLLAMA_SCHED_SPREAD', '0')}",
        pull_delay=float(env.get("STANDIN_PULL_DELAY", "0.01")),
    )
    ready = (
        f"stand-in ollama {VERSION} listening on {host}:{port} "
        f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')} "
        f"OLLAMA_SCHED_SPREAD={env.get('OLLAMA_SCHED_SPREAD', '')} "
        f"OLLAMA_FLASH_ATTENTION={env.get('OLLAMA_FLASH_ATTENTION', '')} "
        f"OLLAMA_KV_CACHE_TYPE={env.get('OLLAMA_KV_CACHE_TYPE', '')} "
        f"OLLAMA_CONTEXT_LENGTH={env.get('OLLAMA_CONTEXT_LENGTH', '')} "
        f"OLLAMA_NUM_PARALLEL={env.get('OLLAMA_NUM_PARALLEL', '')} "
        f"OLLAMA_KEEP_ALIVE={keep})"
    )
    ready = "\n".join([ready, *_device_lines(gpus)])  # the device lines follow, as in the real log
    asyncio.run(_serve(app, sock, ready))
    return 0


def _client(method: str, path: str, body: Any = None) -> Any:
    host, port = _ollama_host()
    req = urllib.request.Request(
        f"http://{host}:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    return urllib.request.urlopen(req, timeout=600)


def ollama_cli(argv: list[str]) -> int:
    """The ``ollama`` executable's commands the deployment uses."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print("Usage: ollama [serve|pull|list|--version] (stand-in)")
        return 0
    if argv[0] in ("--version", "-v"):
        print(f"ollama version is {VERSION} (stand-in)")
        return 0
    if argv[0] == "serve":
        return _ollama_serve()
    if argv[0] == "pull" and len(argv) > 1:
        with _client("POST", "/api/pull", {"model": argv[1]}) as r:
            for line in r:
                msg = json.loads(line)
                if "total" in msg:
                    print(f"\r{msg['status']}: {100 * msg['completed'] // msg['total']}%", end="", flush=True)
                else:
                    lead = "\n" if msg["status"] != "pulling manifest" else ""
                    print(lead + msg["status"], end="", flush=True)
        print()
        return 0
    if argv[0] == "list":
        with _client("GET", "/api/tags") as r:
            models = json.loads(r.read())["models"]
        print(f"{'NAME':<24}{'SIZE':>10}")
        for m in models:
            print(f"{m['name']:<24}{m['size'] / 1e9:>8.1f} GB")
        return 0
    print(f"Error: unknown command {argv[0]!r} (stand-in)", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> None:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["ollama"]:
        sys.exit(ollama_cli(args_in[1:]))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token-delay", type=float, default=TOKEN_DELAY)
    parser.add_argument("--model", default=MODEL, help="the one model this stand-in serves")
    args = parser.parse_args(args_in)
    sock = _bind(args.host, args.port)
    app = Upstream(
        args.token_delay, models=Models(args.model, None, KEEP_ALIVE), tag=str(sock.getsockname()[1])
    )
    asyncio.run(_serve(app, sock, f"READY {sock.getsockname()[1]}"))


if __name__ == "__main__":
    main()
