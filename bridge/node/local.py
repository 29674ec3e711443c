"""The bridge's local endpoint (``--listen``): its routes served over plain HTTP next to it
(``/r/<route>/...`` and the default route at ``/``; its own Prometheus series at
``/_bridge/metrics``), so that programs beside the bridge (Open WebUI talking to the engine) go
through the same forwarding, metering and load balancing as tunnelled requests.

It follows the relay's HTTP rules because it calls the same functions (:mod:`bridge.httprules`):
the same addressing (a route name that is empty, ``.``, ``..`` or percent-encoded is refused), the
same request checks, the same key headers, the same words when a request fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import AsyncIterator, Iterator

import prometheus_client as prom
import uvicorn

from ..asgi import Receive, Scope, Send, json_response, raw_headers, respond, text_headers
from ..config import BridgeConfig, parse_listen
from ..errors import ConfigError, StreamError
from ..httprules import failure_words, header, presented_key, resolve, valid_request
from ..wire.constants import ErrorCode
from .metering import RequestMeter
from .upstream import Upstreams

log = logging.getLogger("bridge.node")


class LocalServer(uvicorn.Server):
    """uvicorn on a socket bound beforehand, without its own signal handling (the bridge's)."""

    def __init__(self, config: uvicorn.Config, sock: socket.socket) -> None:
        super().__init__(config)
        self._sock = sock

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def serve_forever(self) -> None:
        await self.serve(sockets=[self._sock])


def start_local(config: BridgeConfig, upstreams: Upstreams, registry: prom.CollectorRegistry) -> LocalServer:
    """Bind the local endpoint's socket (``config.listen``) and make its server; the caller runs
    :meth:`LocalServer.serve_forever`. Raises ConfigError when the address cannot be used."""
    host, port = parse_listen(config.listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # so asyncio sets TCP_NODELAY
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc}") from exc
    sock.listen(256)
    sock.setblocking(False)
    server = LocalServer(
        uvicorn.Config(
            LocalApp(config, upstreams, registry),
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            timeout_graceful_shutdown=int(config.drain_timeout) or 1,
        ),
        sock,
    )
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "local endpoint on http://%s:%d/ (routes at /r/<route>/, %s at /)%s",
        shown,
        int(sock.getsockname()[1]),
        config.served_at_root or "no route",
        " (key required)" if config.listen_key else "",
    )
    return server


class LocalDownstream:
    """A local client as the :class:`~bridge.node.downstream.Downstream` of a forwarded request."""

    def __init__(self, send: Send, route: str) -> None:
        self._send = send
        self._route = route
        self.started = False
        self.finished = False
        self.aborted = False

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": raw_headers(headers)})

    async def write(self, data: bytes) -> None:
        if data:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self) -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def fail(self, code: int, reason: str) -> None:
        if self.started:
            self.aborted = True  # the app raises: uvicorn cuts the connection, the client sees it
            return
        self.finished = True
        status, words = failure_words(code, self._route)  # the relay's words for the same failure
        await json_response(self._send, status, {"error": words, "code": code})


class LocalApp:
    """The ASGI app of the local endpoint, forwarding with :meth:`Upstreams.forward_http` exactly
    as tunnelled requests are."""

    def __init__(self, config: BridgeConfig, upstreams: Upstreams, registry: prom.CollectorRegistry) -> None:
        self.config = config
        self.upstreams = upstreams
        self.registry = registry
        self._key = config.listen_key.encode()

    def _authorized(self, headers: list[tuple[str, str]]) -> tuple[bool, list[tuple[str, str]]]:
        """Whether the request presents the endpoint's key (when it has one), and its headers
        without that key (it is for the endpoint, not for the upstream)."""
        if not self._key:
            return True, headers
        ok = False
        rest = []
        for name, value in headers:
            found = presented_key(name, value)
            if found and hmac.compare_digest(found[1].encode(), self._key):
                ok = True
                continue
            rest.append((name, value))
        return ok, rest

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        ok, headers = self._authorized(text_headers(scope["headers"]))
        if not ok:
            await json_response(send, 401, {"error": "a key is required (Authorization: Bearer <key>)"})
            return
        raw: bytes = scope.get("raw_path") or scope["path"].encode("utf-8")
        if raw == b"/_bridge/metrics":
            await respond(
                send,
                200,
                [(b"content-type", prom.CONTENT_TYPE_LATEST.encode())],
                prom.generate_latest(self.registry),
            )
            return
        address = resolve(raw, scope.get("query_string", b""), self.config.served_at_root)
        if address is None:
            await json_response(send, 404, {"error": "unknown route"})
            return
        route, target = address.route, address.target
        method: str = scope["method"]
        if not valid_request(method, target):
            await json_response(send, 400, {"error": "invalid method or request target"})
            return
        if route not in self.upstreams.pools:
            status, words = failure_words(ErrorCode.NO_ROUTE, route)
            await json_response(send, status, {"error": words})
            return
        await self._forward(receive, send, method, route, target, headers)

    async def _forward(
        self,
        receive: Receive,
        send: Send,
        method: str,
        route: str,
        target: str,
        headers: list[tuple[str, str]],
    ) -> None:
        meter = RequestMeter(
            route=route,
            method=method,
            target=target,
            via="local",
            request_id=header(headers, "x-request-id") or "",
        )
        first = await receive()
        if first["type"] == "http.disconnect":
            return
        more = bool(first.get("more_body"))
        data: bytes = first.get("body", b"")
        length = header(headers, "content-length")
        has_body = (
            more or bool(data) or (length not in (None, "", "0")) or header(headers, "transfer-encoding")
        )
        body_done = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            nonlocal more
            try:
                if data:
                    yield data
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise StreamError(ErrorCode.CANCEL, "client gone")
                    more = bool(message.get("more_body"))
                    if message.get("body"):
                        yield message["body"]
            finally:
                body_done.set()

        if not has_body:
            body_done.set()
        down = LocalDownstream(send, route)
        task = asyncio.create_task(
            self.upstreams.forward_http(
                method, route, target, headers, body() if has_body else None, down, meter
            )
        )

        async def watch() -> None:  # the client going away cancels the forwarding (and the upstream's work)
            await body_done.wait()
            while (await receive())["type"] != "http.disconnect":
                pass
            if not down.finished:
                task.cancel()

        watcher = asyncio.create_task(watch())
        try:
            await asyncio.wait({task})
        finally:
            watcher.cancel()
            task.cancel()
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
        if down.aborted:
            raise ConnectionAbortedError("upstream failed mid-response")
