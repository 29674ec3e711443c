"""Proxying one client's HTTP request through a node: the request's checks and headers, its body
(read whole when small, else streamed with flow control), repeated requests handed to the shared
answers, and the response streamed back as it arrives (a stream cut mid-response breaks the client's
body, never passes a truncated one off as complete)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from urllib.parse import quote, unquote

from ..asgi import HOLD_HEAD, Message, Receive, Scope, Send, client_host, raw_headers, read_body, server_port
from ..config import RelayConfig
from ..errors import StreamError
from ..httprules import (
    NODE_COOKIE,
    Address,
    cookie,
    forward_headers,
    header,
    response_headers,
    route_gets_cookies,
    scoped_set_cookie,
    valid_request,
)
from ..tunnel.stream import Stream
from ..wire.constants import ErrorCode
from .auth import Granted
from .forward import (
    BODY_STALLED,
    INVALID_HEAD,
    INVALID_REQUEST,
    RELAY_DRAINING,
    STALLED,
    Answer,
    Exchange,
    Forwarder,
    Request,
    send_answer,
)
from .pool import Want
from .shared import SharedAnswers, identity
from .state import RelayState
from .users import Users

log = logging.getLogger("bridge.relay")

#: Request bodies up to this size (with a Content-Length) are read before a node is chosen.
BUFFER_LIMIT = 1024 * 1024


class Proxy:
    def __init__(
        self, state: RelayState, forwarder: Forwarder, shared: SharedAnswers, users: Users | None = None
    ) -> None:
        self.state = state
        self.forwarder = forwarder
        self.shared = shared
        self.users = users or Users(state.config, state.store)

    async def handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        auth: Granted,
        address: Address,
        client_headers: list[tuple[str, str]],
    ) -> None:
        """Proxy a request whose key was granted; ``client_headers``: its headers as text."""
        method: str = scope["method"]
        if not valid_request(method, address.target):
            await send_answer(send, INVALID_REQUEST)
            return
        if self.state.pool.draining:
            await send_answer(send, RELAY_DRAINING)
            return
        client = client_host(scope)
        headers = forward_headers(
            client_headers,
            client=client,
            https=scope.get("scheme") in ("https", "wss"),
            prefix=address.prefix,
            drop_bearer=auth.how == "bearer",
            send_cookies=gets_cookies(self.state.config, scope, address),
        )
        headers = self.users.headers(headers, address.route, auth.key_id)
        chunked = header(client_headers, "transfer-encoding") is not None
        if chunked:  # the body is framed by chunks: a Content-Length beside them is a smuggling attempt
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        length = header(headers, "content-length")
        if length is not None and not length.isdigit():
            await send_answer(send, Answer(400, {"error": "invalid Content-Length"}))
            return
        max_body = self.state.config.max_body
        if max_body and length is not None and int(length) > max_body:
            await send_answer(send, Answer(413, {"error": f"body exceeds {max_body} bytes"}))
            return
        has_body = chunked or (length is not None and int(length) > 0)
        # A small body is read before a node is chosen: it names the model, it can be sent again to
        # another node (retry once), and it identifies a repeated request. Larger ones stream.
        body: bytes | None = b""
        if has_body:
            body = None
            if not chunked and length is not None and int(length) <= BUFFER_LIMIT:
                try:
                    body = await read_body(receive, self.state.config.body_timeout)
                except TimeoutError:
                    await send_answer(send, STALLED)
                    return
                if body is None:
                    return  # the client went away
        sticky = sticky_node(client_headers, auth)
        request = Request(
            method, address.route, address.target, headers, body, client, has_body, prefix=address.prefix
        )
        want = Want(address.route, request.model, sticky, conversation=request.conversation)
        key = identity(auth.key_id, request, self.state.config.idempotency_ttl)
        if key is not None:
            # A shared answer may be read by a request for the same route under another prefix:
            # its cookies are scoped for each reader (the relay's own were dropped when it came).
            await self.shared.handle(scoped_send(send, address), receive, key, request, want)
            return
        await self._forward(send, receive, request, want, auth)

    async def _forward(
        self, send: Send, receive: Receive, request: Request, want: Want, auth: Granted
    ) -> None:
        status = 0
        started = time.perf_counter()
        self.state.metrics.started()

        async def pump(stream: Stream) -> None:
            await self._pump(receive, request, stream)

        try:
            async with self.forwarder.exchange(
                request, want, pump=pump, resend=request.body is not None
            ) as outcome:
                if isinstance(outcome, Answer):
                    status = outcome.status
                    await send_answer(send, outcome)
                    return
                status = await self._respond(send, request, outcome, want.sticky, auth, started)
        finally:
            self.state.metrics.finished(request.route, status)
            if not self.state.metrics.in_flight:
                await self.state.pool.notify()

    async def _respond(
        self,
        send: Send,
        request: Request,
        exchange: Exchange,
        sticky: str | None,
        auth: Granted,
        started: float,
    ) -> int:
        """Stream the node's answer to the client; the status to record (599: cut mid-response)."""
        head, stream, session = exchange.head, exchange.stream, exchange.session
        passed = response_headers(
            head.status, head.headers, route_prefix=request.prefix, target=request.target
        )
        if passed is None:
            log.warning("node %s sent an invalid response head (status %s)", session.node, head.status)
            stream.reset(ErrorCode.PROTOCOL_ERROR, "invalid response head")
            await send_answer(send, INVALID_HEAD)
            return INVALID_HEAD.status
        out = raw_headers([*passed, ("x-bridge-node", session.node)])
        if auth.how == "cookie" and sticky != session.node:
            out.append((b"set-cookie", node_cookie(session.node)))
        if head.status in (204, 304) or request.method == "HEAD":
            await send({"type": "http.response.start", "status": head.status, "headers": out})
            # No body may follow: the response is complete now, whatever the stream does next
            # (ending it later would drop a keep-alive connection the client already reuses).
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            with contextlib.suppress(StreamError, TimeoutError):
                async with asyncio.timeout(1.0):
                    while await stream.read():
                        pass
            return head.status
        # With a Content-Length, the client sees a complete body once that many bytes came:
        # the response is then finished whatever the stream does, and never sent more.
        declared = header(passed, "content-length")
        left = int(declared) if declared is not None else None
        start: dict[str, object] = {"type": "http.response.start", "status": head.status, "headers": out}
        if stream.chunk_ready() and left != 0:
            # Body bytes came with the head and the first read sends them: one write for both.
            start[HOLD_HEAD] = True
        await send(start)
        first = True
        while True:
            try:
                chunk = await stream.read()
            except StreamError as exc:
                if left == 0:
                    break
                log.warning(
                    "stream %d (%s %s) cut mid-response: %s", stream.id, request.method, request.route, exc
                )
                return 599  # an aborted response; not finishing it makes the server drop the client
            if first:
                self.state.metrics.ttfb.observe(time.perf_counter() - started)
                first = False
            if not chunk:
                if left:
                    log.warning(
                        "stream %d (%s %s) ended %d bytes short",
                        stream.id,
                        request.method,
                        request.route,
                        left,
                    )
                    return 599
                break
            if left is not None:
                chunk = chunk[:left]
                left -= len(chunk)
                if not chunk:
                    continue
            self.state.metrics.response_bytes.inc(len(chunk))
            # The peer's end came with this chunk: the response ends with it (one send less).
            more = not stream.ending() or bool(left)
            await send({"type": "http.response.body", "body": chunk, "more_body": more})
            if not more:
                await stream.read()  # the end, there already
                return head.status
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return head.status

    async def _pump(self, receive: Receive, request: Request, stream: Stream) -> None:
        """Send the request body as credit allows (``request.body`` when it was read already, else
        from the client, at most max_body bytes, chunked or not), then watch for the client going
        away: either way the stream is reset (CANCEL, or BODY_TOO_LARGE)."""
        total = 0
        max_body = self.state.config.max_body
        try:
            if request.has_body and request.body is not None:
                self.state.metrics.request_bytes.inc(len(request.body))
                await stream.write(request.body, end=True)
            elif request.has_body:
                idle = self.state.config.body_timeout or None
                while True:
                    try:
                        message = await asyncio.wait_for(receive(), idle)
                    except TimeoutError:
                        stream.reset(ErrorCode.CANCEL, BODY_STALLED)
                        return
                    if message["type"] == "http.disconnect":
                        stream.reset(ErrorCode.CANCEL, "client went away")
                        return
                    chunk = message.get("body", b"")
                    more = message.get("more_body", False)
                    self.state.metrics.request_bytes.inc(len(chunk))
                    total += len(chunk)
                    if max_body and total > max_body:
                        stream.reset(ErrorCode.BODY_TOO_LARGE, f"body exceeds {max_body} bytes")
                        return
                    await stream.write(chunk, end=not more)
                    if not more:
                        break
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    stream.reset(ErrorCode.CANCEL, "client went away")
                    return
        except StreamError:
            return


def gets_cookies(config: RelayConfig, scope: Scope, address: Address) -> bool:
    """Whether this request's route receives the browser's cookies (docs/security.md §5)."""
    port_route = server_port(scope) in config.route_ports
    return route_gets_cookies(address.prefix, port_route, address.route, config.cookie_routes)


def scoped_send(send: Send, address: Address) -> Send:
    """``send`` with the ``Set-Cookie`` values of the response head scoped to ``address``'s route
    prefix (httprules.scoped_set_cookie)."""
    if not address.prefix:
        return send

    async def scoped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [
                (
                    k,
                    scoped_set_cookie(v.decode("latin-1"), address.prefix, address.target).encode("latin-1")
                    if k.lower() == b"set-cookie"
                    else v,
                )
                for k, v in message["headers"]
            ]
        await send(message)

    return scoped


def sticky_node(headers: list[tuple[str, str]], auth: Granted) -> str | None:
    """The node a browser (cookie login) was served by before, if it says."""
    value = cookie(headers, NODE_COOKIE) if auth.how == "cookie" else None
    return unquote(value) if value else None


def node_cookie(node: str) -> bytes:
    return f"{NODE_COOKIE}={quote(node, safe='')}; Path=/; HttpOnly; SameSite=Lax".encode()
