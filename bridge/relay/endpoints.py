"""The relay's own endpoints under ``/_relay/`` (health, status page and JSON, Prometheus metrics,
jobs, browser login and logout), and its answer to a client it does not let in."""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qs, quote

from .. import __version__
from ..asgi import (
    Receive,
    Scope,
    Send,
    client_host,
    html_response,
    json_response,
    redirect,
    respond,
    text_headers,
)
from ..httprules import COOKIE_NAME, header, safe_next
from ..wire.constants import PROTOCOL_VERSION
from .auth import Authenticator, Granted, Refused, foreign_origin, origin_refusal, public_host
from .bodies import BodyRefused, read_small_body, refuse_body
from .jobs import Jobs
from .pages import login_page, status_page
from .state import RelayState

log = logging.getLogger("bridge.relay")

#: The largest login form read (a key and a ``next`` path).
MAX_LOGIN_FORM = 8192
#: Seconds the whole login form may take to arrive (or ``--body-timeout``, when shorter): the form
#: fits a packet or two, and the stall timeout alone counts from the last byte, so a client sending
#: a byte now and then held a connection for days. Then 408 and the connection closed.
LOGIN_BODY_DEADLINE = 5.0
#: The 401 of a request that presented no valid key.
KEY_REQUIRED = (
    "a valid client key is required: Authorization: Bearer <key>, X-Bridge-Key, or log in at /_relay/login"
)


class Endpoints:
    def __init__(self, state: RelayState, auth: Authenticator, jobs: Jobs) -> None:
        self.state = state
        self.auth = auth
        self.jobs = jobs
        self.started_at = time.time()

    def check(self, scope: Scope, headers: list[tuple[str, str]] | None = None) -> Granted | Refused:
        """The auth decision for a request (or WebSocket) with this scope (``headers``: its
        headers as text, when the caller has them already)."""
        if headers is None:
            headers = text_headers(scope["headers"])
        return self.auth.check(headers, self.auth.address(client_host(scope), headers))

    def cross_origin(
        self, scope: Scope, granted: Granted, headers: list[tuple[str, str]] | None = None
    ) -> str | None:
        """The 403's words when a granted request (or WebSocket) must not go on for its Origin
        (docs/security.md §6), else None."""
        if headers is None:
            headers = text_headers(scope["headers"])
        websocket = scope["type"] == "websocket"
        return origin_refusal(
            headers,
            method="GET" if websocket else scope["method"],
            websocket=websocket,
            how=granted.how,
            allowed=self.state.config.allowed_origins,
            host=public_host(client_host(scope) or "", headers, self.auth.trusted_proxies),
        )

    async def handle(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        method = scope["method"]
        if path == "/_relay/health":
            await json_response(send, 200, self.health())
        elif path == "/_relay/login":
            await self._login(scope, receive, send)
        elif path == "/_relay/jobs" or path.startswith("/_relay/jobs/"):
            decision = self.check(scope)
            if isinstance(decision, Refused):
                await deny(scope, send, decision)
            elif refused := self.cross_origin(scope, decision):
                await json_response(send, 403, {"error": refused})
            else:
                await self.jobs.handle(scope, receive, send, decision.key_id, path)
        elif path == "/_relay/logout":
            # Ends the session on the relay (every copy of the cookie stops working), not only
            # the browser's copy. A GET from anywhere may log a browser out: harmless.
            found = self.auth.session(text_headers(scope["headers"]))
            if found is not None:
                self.auth.sessions.end(found[1])
            gone = f"{COOKIE_NAME}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax".encode()
            await redirect(send, "/_relay/login", [(b"set-cookie", gone)])
        elif path in ("/_relay/", "/_relay", "/_relay/status", "/_relay/metrics"):
            decision = self.check(scope)
            if isinstance(decision, Refused):
                await deny(scope, send, decision)
            elif path in ("/_relay/", "/_relay"):
                await html_response(send, 200, status_page(self.status()))
            elif path == "/_relay/status":
                await json_response(send, 200, self.status())
            else:
                content_type, series = self.state.metrics.exposition()
                await respond(send, 200, [(b"content-type", content_type)], series)
        else:
            await json_response(send, 404 if method in ("GET", "HEAD") else 405, {"error": "not found"})

    def health(self) -> dict[str, Any]:
        """No secrets: whether a node is connected, since when, when the last one left, load."""
        connected = self.state.store.last_node_event("connected")
        left = self.state.store.last_node_event("disconnected")
        live = self.state.pool.live()
        return {
            "status": "ok" if live else "no_node",
            "node_connected": bool(live),
            "nodes": len(live),
            "connected_since": _iso(min(s.connected_at for s in live)) if live else None,
            "last_connected_at": _iso(connected[0]) if connected else None,
            "last_disconnected_at": _iso(left[0]) if left else None,
            "requests_in_flight": self.state.metrics.in_flight,
            "requests_waiting": self.state.pool.waiting,
            "websockets_open": self.state.metrics.websockets,
            "draining": self.state.pool.draining,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
        }

    def status(self) -> dict[str, Any]:
        return {
            **self.health(),
            "uptime_s": round(time.time() - self.started_at, 1),
            "default_route": self.state.config.default_route,
            "route_ports": {str(k): v for k, v in self.state.config.route_ports.items()},
            "nodes_detail": [
                {
                    "node": s.node,
                    "session": s.session,
                    "routes": sorted(s.routes),
                    "connected_since": _iso(s.connected_at),
                    "streams": s.load,
                    "models": sorted(s.models),
                    "draining": s.draining,
                    "info": s.info,
                    **self.state.metrics.stats.latest.get(s.node, {}),
                }
                for s in self.state.pool.sessions
            ],
        }

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        next_url = safe_next(query.get("next", ["/"])[0])
        if scope["method"] == "GET":
            await html_response(send, 200, login_page(next_url, ""))
            return
        if scope["method"] != "POST":
            await json_response(send, 405, {"error": "use GET or POST"})
            return
        headers = text_headers(scope["headers"])
        host = public_host(client_host(scope) or "", headers, self.auth.trusted_proxies)
        error = foreign_origin(headers, host, self.state.config.allowed_origins)
        if error is not None:
            # Login CSRF: a foreign page logging the browser into the attacker's key.
            await json_response(send, 403, {"error": error})
            return
        address = self.auth.address(client_host(scope), headers)
        idle = self.state.config.body_timeout
        deadline = min(LOGIN_BODY_DEADLINE, idle) if idle else LOGIN_BODY_DEADLINE
        body = await read_small_body(headers, receive, MAX_LOGIN_FORM, idle, deadline)
        if body is None:
            return  # the client went away
        if isinstance(body, BodyRefused):
            await refuse_body(send, body)
            return
        form = parse_qs(body.decode("utf-8", "replace"))
        key = form.get("key", [""])[0].strip()
        next_url = safe_next(form.get("next", [next_url])[0])
        key_id = self.auth.keys.check(key)
        if key_id is None:
            # The key is checked first: a right one is always let in, a wrong one counts, and
            # gets 429 once its address is over the limit (docs/security.md §7).
            refused = self.auth.wrong_key(address)
            if refused.status == 429:
                await deny(scope, send, refused)
                return
            log.warning("failed login from %s", address)
            await html_response(send, 401, login_page(next_url, "That key is not valid."))
            return
        # A login is a request of its key: it counts against the key's rate (--key-rate), as
        # every request with the key or its cookie does; beyond it, 429 and no new session.
        over_rate = self.auth.rates.refusal(key_id)
        if over_rate is not None:
            await deny(scope, send, over_rate)
            return
        https = scope.get("scheme") == "https" or header(headers, "x-forwarded-proto") == "https"
        cookies = self.auth.cookies
        session_id = self.auth.sessions.start(key_id, time.time() + cookies.max_age)
        cookie = (
            f"{COOKIE_NAME}={cookies.issue(key_id, session_id)}; Path=/; Max-Age={cookies.max_age}; "
            f"HttpOnly; SameSite=Lax{'; Secure' if https else ''}"
        )
        await redirect(send, next_url, [(b"set-cookie", cookie.encode()), (b"cache-control", b"no-store")])


async def deny(scope: Scope, send: Send, refused: Refused) -> None:
    """Answer a request the relay does not let in: 429 with Retry-After (too many failures, or the
    key's rate), a browser's page load sent to the login page, anything else 401."""
    if refused.status == 429:
        extra = [(b"retry-after", str(refused.retry_after).encode())]
        await json_response(send, 429, {"error": refused.reason}, extra=extra)
        return
    accept = header(text_headers(scope["headers"]), "accept") or ""
    if scope["method"] == "GET" and "text/html" in accept:
        target = scope.get("raw_path", b"/").decode("latin-1")
        if scope.get("query_string"):
            target += "?" + scope["query_string"].decode("latin-1")
        location = "/_relay/login?next=" + quote(target, safe="")
        await redirect(send, location, [(b"cache-control", b"no-store")])
        return
    extra = [(b"www-authenticate", b'Bearer realm="bridge"')]
    await json_response(send, 401, {"error": KEY_REQUIRED}, extra=extra)


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))
