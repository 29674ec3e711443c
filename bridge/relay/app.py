"""The relay: the public side, an ASGI application (served by uvicorn, see :mod:`.server`) that

* accepts bridges on the WebSocket ``/_relay/connect`` (:mod:`.sessions`);
* serves clients: the default route at ``/``, every route at ``/r/<route>/...``, a route at the root
  of an extra port (``--route-port``), and its own endpoints under ``/_relay/`` (:mod:`.endpoints`);
* lets in only clients with a key or the login cookie (:mod:`.auth`) and never forwards its own
  credentials;
* forwards each request on one path (:mod:`.forward`) to a node it picks (:mod:`.pool`), holding
  requests while no bridge is connected for ``grace`` seconds, then answering 503; HTTP through
  :mod:`.proxy`, repeated requests and jobs through :mod:`.shared` and :mod:`.jobs`, client
  WebSockets through :mod:`.websocket`.

This module wires the rooms together and dispatches each ASGI call to one of them.
"""

from __future__ import annotations

import asyncio
import time

from ..asgi import Receive, Scope, Send, server_port, text_headers
from ..config import RelayConfig, parse_networks
from ..httprules import Address, resolve
from ..ratelimit import FailureLimiter
from ..stats import AffinityCounts
from .auth import Authenticator, CookieSigner, KeyRates, KeyRing, KeyStreams, Refused
from .endpoints import Endpoints, deny
from .forward import RELAY_DRAINING, Answer, Forwarder, send_answer, unknown_route
from .jobs import Jobs
from .metrics import RelayMetrics
from .pool import Pool
from .proxy import Proxy, gets_cookies
from .sessions import Bridges
from .shared import SharedAnswers, SharedCache
from .state import RelayState
from .store import Store
from .users import Users
from .websocket import ClientSockets
from .websocket import deny as deny_websocket


class Relay:
    """The ASGI application. ``store`` persists keys, timestamps and jobs; see :func:`.server.serve`."""

    def __init__(self, config: RelayConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.metrics = RelayMetrics()
        self.pool = Pool(config.grace)
        self.metrics.registry.register(
            AffinityCounts("bridge_relay_affinity", [], lambda: [([], self.pool.affinity)])
        )
        state = RelayState(config, store, self.pool, self.metrics)
        self.auth = Authenticator(
            KeyRing(store, config.api_keys),
            CookieSigner(store.secret("cookie_secret")),
            # Failed logins and client keys per client address (brute force -> 429); wrong node
            # tokens counted apart; a right credential is always accepted.
            FailureLimiter(config.login_rate),
            KeyRates(config.key_rate, config.key_burst),
            node_failures=FailureLimiter(config.login_rate),
            trusted_proxies=parse_networks(config.trusted_proxies),
        )
        self.forwarder = Forwarder(self.pool, self.metrics)
        cache = SharedCache(
            config.idempotency_ttl,
            config.idempotency_entries,
            config.shared_max_bytes,
            config.idempotency_bytes,
        )
        self.shared = SharedAnswers(state, cache, self.forwarder)
        #: Streams each key has open (requests, WebSockets, running jobs): --key-streams.
        self.key_streams = KeyStreams(config.key_streams)
        # One cache of the keys' labels for every way a request reaches an upstream.
        users = Users(config, store)
        self.jobs = Jobs(state, self.shared, self.key_streams, users)
        self.bridges = Bridges(state, self.auth, config.node_token or store.secret("node_token"))
        self.proxy = Proxy(state, self.forwarder, self.shared, users)
        self.sockets = ClientSockets(self.forwarder, self.metrics, users)
        self.endpoints = Endpoints(state, self.auth, self.jobs)
        # Nodes the last run saw connected and never saw leave (it was killed): they left when it
        # was last known alive.
        alive = store.get_meta("alive_at")
        store.close_dangling(float(alive) if alive else time.time())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            if scope["path"] == "/_relay/connect":
                await self.bridges.handle(scope, receive, send)
            else:
                await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path.startswith("/_relay/") or path == "/_relay":
            await self.endpoints.handle(scope, receive, send, path)
            return
        headers = text_headers(scope["headers"])
        decision = self.endpoints.check(scope, headers)
        if isinstance(decision, Refused):
            await deny(scope, send, decision)
            return
        if foreign := self.endpoints.cross_origin(scope, decision, headers):
            await send_answer(send, Answer(403, {"error": foreign}))
            return
        address = self._resolve(scope)
        if address is None:
            await send_answer(send, unknown_route())
            return
        refused = self.key_streams.acquire(decision.key_id)
        if refused is not None:
            await deny(scope, send, refused)
            return
        try:
            await self.proxy.handle(scope, receive, send, decision, address, headers)
        finally:
            self.key_streams.release(decision.key_id)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A client WebSocket: same auth and addressing as HTTP."""
        if (await receive())["type"] != "websocket.connect":
            return
        if scope["path"].startswith("/_relay/"):
            await deny_websocket(scope, send, 404, {"error": "not found"})
            return
        decision = self.endpoints.check(scope)
        if isinstance(decision, Refused):
            if decision.status == 429:
                retry = [("retry-after", str(decision.retry_after))]
                await deny_websocket(scope, send, 429, {"error": decision.reason}, retry)
            else:
                await deny_websocket(
                    scope, send, 401, {"error": "a valid client key or login cookie is required"}
                )
            return
        if foreign := self.endpoints.cross_origin(scope, decision):
            await deny_websocket(scope, send, 403, {"error": foreign})  # cross-site WebSocket hijacking
            return
        address = self._resolve(scope)
        if address is None:
            await deny_websocket(scope, send, 404, unknown_route().body)
            return
        if self.pool.draining:
            await deny_websocket(scope, send, 503, RELAY_DRAINING.body)
            return
        refused = self.key_streams.acquire(decision.key_id)
        if refused is not None:
            retry = [("retry-after", str(refused.retry_after))]
            await deny_websocket(scope, send, 429, {"error": refused.reason}, retry)
            return
        cookies = gets_cookies(self.config, scope, address)
        try:
            await self.sockets.handle(scope, receive, send, decision, address, send_cookies=cookies)
        finally:
            self.key_streams.release(decision.key_id)

    def _resolve(self, scope: Scope) -> Address | None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        port_route = self.config.route_ports.get(server_port(scope))
        return resolve(raw_path, scope.get("query_string", b""), self.config.default_route, port_route)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        keep_alive: asyncio.Task[None] | None = None
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                keep_alive = asyncio.create_task(self._keep_alive())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if keep_alive is not None:
                    keep_alive.cancel()
                self.bridges.close_all()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _keep_alive(self) -> None:
        """Note in the store, every few seconds, that the relay is alive (see ``close_dangling``)."""
        while True:
            self.store.set_meta("alive_at", repr(time.time()))
            await asyncio.sleep(min(5.0, self.config.heartbeat))

    async def drain(self, timeout: float) -> None:
        """Stop taking requests and wait (up to ``timeout``) for those in flight."""
        self.pool.draining = True
        await self.pool.notify()
        deadline = time.monotonic() + timeout
        while self.metrics.in_flight and time.monotonic() < deadline:
            await self.pool.wait_change(deadline - time.monotonic())
        self.bridges.close_all()
