"""Ollama's REST API served by the bridge in front of an OpenAI-only engine: the asyncio part.

A route given as ``NAME=openai+URL`` gets an :class:`OllamaFront`. The bridge's one forwarding path
(``Upstreams.forward_http`` in bridge/node/upstream.py, for tunnelled and local-endpoint requests
alike) hands it the requests whose path is Ollama's (:meth:`OllamaFront.serves`: ``/`` and
``/api/...``); everything else on the route (``/v1/...``) goes to the engine untouched. So the
same route serves ``OLLAMA_HOST=<relay>/r/NAME`` and ``base_url=<relay>/r/NAME/v1``.

- Answers the bridge knows itself (``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``, the
  refusals) are written here and recorded with the bridge's ``record``.
- A generation (``/api/chat``, ``/api/generate``) or an embedding is translated
  (:mod:`bridge.ollama`) and sent to the engine through ``forward`` itself, with a downstream
  that translates the answer as it streams (one Ollama line per token, written as soon as its event
  is read) and a meter that sees what the client gets; ``forward`` picks the upstream, counts it
  outstanding, handles its failures and records the request, as for any other.

The engine's model list (``/v1/models``) is kept for :data:`MODELS_TTL` seconds and refreshed in
the background, never on the way of a generation: llama-cpp-python answers ``/v1/models`` only
between generations. A model the list lacks is looked up once more before the 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from ..errors import RequestRefused, StreamError, UpstreamError
from ..httprules import Headers, host_of
from ..ollama import api
from ..wire.constants import STATUS_FOR_CODE, ErrorCode
from .downstream import Downstream, Forward
from .http1 import Client
from .metering import RequestMeter

log = logging.getLogger("bridge.ollama")

#: Largest request body read (a chat with images); beyond: 413.
MAX_BODY = 64 * 1024 * 1024
#: Largest answer gathered from the engine (embeddings of many inputs, an error body).
MAX_ANSWER = 256 * 1024 * 1024
#: Seconds the engine's model list is used before it is refreshed (in the background).
MODELS_TTL = 10.0
#: Seconds to wait for the engine's model list (llama-cpp-python answers it between generations).
MODELS_TIMEOUT = 300.0
#: Ollama's routes and their methods (server/routes.go ``GenerateRoutes``).
ROUTES: dict[str, tuple[str, ...]] = {
    "/": ("GET", "HEAD"),
    "/api/version": ("GET", "HEAD"),
    "/api/tags": ("GET", "HEAD"),
    "/api/ps": ("GET",),
    "/api/show": ("POST",),
    "/api/chat": ("POST",),
    "/api/generate": ("POST",),
    "/api/embed": ("POST",),
    "/api/embeddings": ("POST",),
    "/api/pull": ("POST",),
    "/api/push": ("POST",),
    "/api/create": ("POST",),
    "/api/copy": ("POST",),
    "/api/delete": ("DELETE",),
}
#: Model management: an OpenAI engine's models are fixed when it starts.
MANAGEMENT = frozenset({"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs"})
_JSON_HEAD = "application/json; charset=utf-8"
#: Client headers not passed to the engine: the bridge writes the body, its type and length.
_NOT_PASSED = frozenset({"content-length", "content-type", "accept", "accept-encoding", "expect"})


class OllamaFront:
    """Ollama's API for one route. ``forward`` is the bridge's ``forward_http``; ``record`` writes a
    finished request's record; ``client`` gives the bridge's HTTP client toward the upstreams;
    ``upstreams`` lists the route's upstream URLs, best first."""

    def __init__(
        self,
        route: str,
        *,
        forward: Forward,
        record: Callable[[dict[str, Any]], None],
        client: Callable[[], Client],
        upstreams: Callable[[], list[str]],
    ) -> None:
        self.route = route
        self._forward = forward
        self._record = record
        self._client = client
        self._upstreams = upstreams
        self._models: list[api.EngineModel] | None = None
        self._models_at = 0.0
        self._refresh: asyncio.Task[list[api.EngineModel]] | None = None
        self._first_seen: dict[str, int] = {}

    @staticmethod
    def serves(method: str, target: str) -> bool:
        """Whether the request is Ollama's to answer (else it goes to the engine as it is)."""
        path = target.split("?", 1)[0]
        return path == "/" or path == "/api" or path.startswith("/api/")

    # ------------------------------------------------------------------------------ requests
    async def handle(
        self,
        method: str,
        target: str,
        headers: Headers,
        body: AsyncIterator[bytes] | None,
        down: Downstream,
        meter: RequestMeter,
    ) -> None:
        """Answer one request (see the module docstring)."""
        path = target.split("?", 1)[0]
        methods = ROUTES.get(path) or (("POST", "HEAD") if path.startswith("/api/blobs/") else None)
        try:
            if methods is None:
                await self._local(down, meter, 404, b"404 page not found", "text/plain", method)
                return
            if method not in methods:
                await self._local(down, meter, 405, b"405 method not allowed", "text/plain", method)
                return
            if path == "/":
                await self._local(down, meter, 200, b"Ollama is running", "text/plain; charset=utf-8", method)
                return
            if path in MANAGEMENT or path.startswith("/api/blobs/"):
                raise RequestRefused(
                    501,
                    f"{path} is not available: this route serves Ollama's API in front of an "
                    "OpenAI-compatible engine, whose models are fixed when it starts",
                )
            raw = await self._read(body, meter)
            if path == "/api/version":
                await self._json(down, meter, 200, api.version_answer(), method)
            elif path == "/api/tags":
                await self._json(down, meter, 200, api.tags_answer(await self.models()), method)
            elif path == "/api/ps":
                await self._json(down, meter, 200, api.ps_answer(await self.models(), time.time_ns()))
            else:
                req = api.parse_body(raw)
                name = req.get("model") or req.get("name")
                models = await self.models(name if isinstance(name, str) else "")
                if path == "/api/show":
                    await self._json(down, meter, 200, api.show_answer(req, models))
                elif path in ("/api/chat", "/api/generate"):
                    build = api.chat_request if path == "/api/chat" else api.generate_request
                    await self._generate(build(req, models), headers, down, meter)
                else:
                    build_e = api.embed_request if path == "/api/embed" else api.embeddings_request
                    await self._embed(build_e(req, models), headers, down, meter)
        except RequestRefused as exc:
            with contextlib.suppress(StreamError):
                await self._json(down, meter, exc.status, {"error": exc.message})
                return
            self._record(meter.finish(error="client gone"))
        except StreamError:
            self._record(meter.finish(error="client gone"))
        except Exception as exc:  # a bug here must not leave the client waiting
            log.exception("%s %s%s: the bridge's Ollama API failed", method, self.route, path)
            with contextlib.suppress(Exception):
                await down.fail(
                    ErrorCode.UPSTREAM_ERROR, f"the bridge's Ollama API failed: {type(exc).__name__}"
                )
            self._record(meter.finish(error=f"Ollama API: {type(exc).__name__}"))

    async def _read(self, body: AsyncIterator[bytes] | None, meter: RequestMeter) -> bytes:
        if body is None:
            return b""
        chunks: list[bytes] = []
        size = 0
        async for chunk in body:
            size += len(chunk)
            meter.request_bytes(len(chunk))
            if size > MAX_BODY:
                raise RequestRefused(413, f"request body too large (more than {MAX_BODY} bytes)")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _generate(
        self, gen: api.Generation, headers: Headers, down: Downstream, meter: RequestMeter
    ) -> None:
        if gen.answer:
            await self._json(down, meter, 200, api.immediate_answer(gen, time.time_ns()))
            return
        translator = api.StreamTranslator(gen, int(meter.arrived * 1e9))
        sink = _GenerationSink(down, meter, translator)
        await self._engine(gen.path, gen.body, "text/event-stream", headers, sink, meter, translator)

    async def _embed(
        self, plan: api.Embedding, headers: Headers, down: Downstream, meter: RequestMeter
    ) -> None:
        if not plan.inputs:
            await self._json(down, meter, 200, api.empty_embed_answer(plan))
            return
        sink = _EmbeddingSink(down, meter, plan)
        await self._engine("/v1/embeddings", plan.body, "application/json", headers, sink, meter, sink)

    async def _engine(
        self,
        path: str,
        body: dict[str, Any],
        accept: str,
        headers: Headers,
        sink: Downstream,
        meter: RequestMeter,
        timing: _Timed,
    ) -> None:
        """Send the translated request through the bridge's forwarding: the same upstream choice,
        failure handling and record as every request."""
        data = json.dumps(body, ensure_ascii=False).encode()
        passed = [(k, v) for k, v in headers if k.lower() not in _NOT_PASSED]
        passed += [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Accept", accept),
            ("Accept-Encoding", "identity"),
        ]

        async def once() -> AsyncIterator[bytes]:
            yield data

        leg = _EngineLegMeter(meter, timing)
        await self._forward("POST", self.route, path, passed, once(), sink, leg)

    # ------------------------------------------------------------------------------ answers
    async def _json(
        self, down: Downstream, meter: RequestMeter, status: int, obj: dict[str, Any], method: str = "POST"
    ) -> None:
        data = api.dump(obj)
        await self._local(down, meter, status, data, _JSON_HEAD, method)

    async def _local(
        self, down: Downstream, meter: RequestMeter, status: int, data: bytes, ctype: str, method: str
    ) -> None:
        """An answer the bridge writes itself; recorded like a forwarded one."""
        await _send(down, meter, status, data, ctype, head_only=method == "HEAD")
        self._record(meter.finish())

    # ------------------------------------------------------------------------------ models
    async def models(self, want: str = "") -> list[api.EngineModel]:
        """The engine's models: fetched on first use; afterwards the list in hand, refreshed in the
        background when older than :data:`MODELS_TTL`, or at once for a name it lacks."""
        age = time.monotonic() - self._models_at
        if self._models is None or (want and api.find_model(want, self._models) is None and age > 1.0):
            return await self._refreshed()
        if age > MODELS_TTL and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._fetch(), name=f"ollama-models-{self.route}")
            self._refresh.add_done_callback(_quiet)
        return self._models

    async def _refreshed(self) -> list[api.EngineModel]:
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._fetch(), name=f"ollama-models-{self.route}")
            self._refresh.add_done_callback(_quiet)
        try:
            return await asyncio.shield(self._refresh)
        except RequestRefused:
            if self._models is not None:
                return self._models  # the engine did not answer this time: the list in hand
            raise

    async def _fetch(self) -> list[api.EngineModel]:
        client = self._client()
        why = "no upstream"
        for url in self._upstreams():
            try:
                status, listing = await client.get_json(
                    url,
                    "/v1/models",
                    [("Host", host_of(url)), ("Accept", "application/json")],
                    timeout=MODELS_TIMEOUT,
                )
            except (UpstreamError, OSError, TimeoutError, ValueError) as exc:
                why = str(exc) or type(exc).__name__
                continue
            if status != 200:
                why = f"it answered {status} to /v1/models"
                continue
            models = api.engine_models(listing, time.time_ns(), self._first_seen)
            self._models, self._models_at = models, time.monotonic()
            return models
        log.warning("%s: the engine's models cannot be listed: %s", self.route, why)
        raise RequestRefused(502, f"the engine's models cannot be listed: {why}")


def _quiet(task: asyncio.Task[Any]) -> None:
    """A background refresh's failure was logged; nobody else may be waiting for it."""
    if not task.cancelled():
        task.exception()


async def _send(
    down: Downstream, meter: RequestMeter, status: int, data: bytes, ctype: str, *, head_only: bool = False
) -> None:
    head = [("Content-Type", ctype), ("Content-Length", str(len(data)))]
    meter.response(status, head)
    await down.start(status, head)
    if data and not head_only:
        await down.write(data)
        meter.chunk(data)
    await down.end()


class _Timed(Protocol):
    """Told when the request goes to the engine (the start of Ollama's ``prompt_eval_duration``)."""

    sent_ns: int


class _EngineLegMeter(RequestMeter):
    """The meter ``forward`` sees for the engine leg: it reports to the client's meter when the
    request went out, and how it ended, but not the engine's answer (OpenAI's events): the sinks
    report what the client gets (Ollama's lines), and the client's body was counted as it was read."""

    def __init__(self, client: RequestMeter, timing: _Timed) -> None:
        super().__init__(
            route=client.route,
            method=client.method,
            target=client.target,
            via=client.via,
            request_id=client.request_id,
            arrived=client.arrived,
        )
        self.client = client
        self._timing = timing

    def sent(self, upstream: str) -> None:
        self._timing.sent_ns = time.monotonic_ns()
        self.client.sent(upstream)

    def request_bytes(self, n: int) -> None:
        pass

    def response(self, status: int, headers: list[tuple[str, str]]) -> None:
        pass

    def chunk(self, data: bytes) -> None:
        pass

    def finish(self, error: str = "") -> dict[str, Any]:
        return self.client.finish(error)


def _status_for(code: int) -> int:
    return STATUS_FOR_CODE.get(code, 502)


class _GenerationSink:
    """``forward``'s downstream for a generation: the engine's events in, Ollama's answer out.

    The client's answer starts with its first line, as Ollama's does (gin writes the head with the
    first chunk): an engine that fails before any token gets an HTTP error status and
    ``{"error": ...}``; one that fails after gets one more line ``{"error": ...}`` and the stream
    ends cleanly (server/routes.go ``streamResponse``)."""

    def __init__(self, down: Downstream, meter: RequestMeter, translator: api.StreamTranslator) -> None:
        self.down = down
        self.meter = meter
        self.tr = translator
        self.status = 0
        self.started = False
        self._whole = False
        self._error = bytearray()

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status
        ctype = next((v for k, v in headers if k.lower() == "content-type"), "")
        self._whole = status == 200 and ctype.split(";")[0].strip().lower() == "application/json"

    async def _begin(self) -> None:
        head = [("Content-Type", api.NDJSON)]
        self.meter.response(200, head)
        await self.down.start(200, head)
        self.started = True

    async def _line(self, data: bytes) -> None:
        if not self.started:
            await self._begin()
        await self.down.write(data)
        self.meter.chunk(data)

    async def write(self, data: bytes) -> None:
        if self.status != 200 or self._whole:
            if len(self._error) < MAX_ANSWER:
                self._error += data  # an error, or a whole answer that did not stream
            return
        out = self.tr.feed(data, time.monotonic_ns(), time.time_ns())
        if out:
            await self._line(out)

    async def end(self) -> None:
        if self.status != 200:
            status, message = api.engine_error(self.status, bytes(self._error))
            await _send(self.down, self.meter, status, _error_json(message), _JSON_HEAD)
            return
        if self._whole:  # an engine that does not stream: its whole answer as one line
            out = self.tr.feed_whole(bytes(self._error), time.monotonic_ns(), time.time_ns())
            if out:
                await self._line(out)
        failure = self.tr.failure
        if failure:
            await self._failed(500, failure)
            return
        final = api.dump(self.tr.finish(time.monotonic_ns(), time.time_ns()))
        if self.tr.gen.stream:
            await self._line(final + b"\n")
            await self.down.end()
        else:
            await _send(self.down, self.meter, 200, final, _JSON_HEAD)

    async def fail(self, code: int, reason: str) -> None:
        """The engine could not be reached, or its answer broke off (forward's failures)."""
        if self.status:  # it had answered: it broke off mid-answer
            status, message = 500, f"an error was encountered while running the model: {reason}"
        else:
            status, message = _status_for(code), reason
        with contextlib.suppress(StreamError, OSError):
            await self._failed(status, message)

    async def _failed(self, status: int, message: str) -> None:
        if self.started:
            await self._line(api.failure_line(message))
            await self.down.end()
        else:
            await _send(self.down, self.meter, status, _error_json(message), _JSON_HEAD)


class _EmbeddingSink:
    """``forward``'s downstream for an embedding: the engine's whole answer, then Ollama's."""

    def __init__(self, down: Downstream, meter: RequestMeter, plan: api.Embedding) -> None:
        self.down = down
        self.meter = meter
        self.plan = plan
        self.status = 0
        self.sent_ns = 0
        self.arrived_ns = int(meter.arrived * 1e9)
        self._body = bytearray()
        self._too_big = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status

    async def write(self, data: bytes) -> None:
        if len(self._body) + len(data) > MAX_ANSWER:
            self._too_big = True
            return
        self._body += data

    async def end(self) -> None:
        if self.status != 200:
            status, message = api.engine_error(self.status, bytes(self._body))
            await _send(self.down, self.meter, status, _error_json(message), _JSON_HEAD)
            return
        try:
            if self._too_big:
                raise RequestRefused(500, "the engine's embeddings answer is too large")
            try:
                answer = json.loads(self._body)
            except ValueError:
                raise RequestRefused(500, "the engine's embeddings answer is not JSON") from None
            now = time.monotonic_ns()
            out = api.embed_answer(self.plan, answer, now - self.arrived_ns, self.sent_ns - self.arrived_ns)
        except RequestRefused as exc:
            await _send(self.down, self.meter, exc.status, _error_json(exc.message), _JSON_HEAD)
            return
        await _send(self.down, self.meter, 200, api.dump(out), _JSON_HEAD)

    async def fail(self, code: int, reason: str) -> None:
        status = 500 if self.status else _status_for(code)
        with contextlib.suppress(StreamError, OSError):
            await _send(self.down, self.meter, status, _error_json(reason), _JSON_HEAD)


def _error_json(message: str) -> bytes:
    return api.dump({"error": message})
