"""Configuration as small typed value objects: one for the relay, one for the bridge, and the parsers
of what users type (routes, route ports, listen addresses, the relay's URL). The CLI builds them from
flags and ``BRIDGE_*`` variables; every check that does not need the network happens here, so a
mistake is a :class:`~bridge.errors.ConfigError` before anything starts."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError
from .httprules import is_loopback
from .wire.constants import DEFAULT_MAX_FRAME, DEFAULT_MAX_STREAMS, DEFAULT_WINDOW

#: The shortest node token or client key an operator may choose (``BRIDGE_NODE_TOKEN``,
#: ``BRIDGE_API_KEYS``): those the relay makes are longer.
MIN_SECRET = 32
ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: A node's name (HELLO ``node``, ``--node-name``): it becomes a metric label, a header value and a
#: cookie value, so only characters safe in each (docs/spec/wire.md §5).
NODE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
#: The routes ``bridge connect`` and ``bridge up`` offer when none is given.
DEFAULT_ROUTES = ("ollama=http://127.0.0.1:11434", "webui=http://127.0.0.1:8080")
#: What an upstream speaks, given before its URL's scheme (``NAME=openai+http://...``): ``openai``
#: is an engine with only OpenAI's API, in front of which the bridge serves Ollama's REST API itself
#: (bridge/ollama/). Without it the upstream gets every request as it is.
ROUTE_APIS = ("openai",)


@dataclass(frozen=True, slots=True)
class Route:
    """A named upstream the bridge forwards to: ``name=http://host:port[/base]``, or
    ``name=openai+http://...`` for an OpenAI-only engine (``api``, see :data:`ROUTE_APIS`). A route
    with several upstreams (replicas) is several Routes of the same name."""

    name: str
    url: str
    api: str = ""

    @classmethod
    def parse(cls, text: str) -> Route:
        name, sep, url = text.partition("=")
        name = name.strip().lower()
        url = url.strip().rstrip("/")
        if not sep or not ROUTE_NAME.match(name):
            raise ConfigError(f"route {text!r}: expected NAME=URL with NAME made of a-z, 0-9, '-', '_'")
        api = ""
        scheme, colon, rest = url.partition("://")
        if colon and "+" in scheme:
            api, _, scheme = scheme.partition("+")
            if api not in ROUTE_APIS:
                raise ConfigError(
                    f"route {name}: unknown API {api!r} before the URL (known: {', '.join(ROUTE_APIS)})"
                )
            url = f"{scheme}://{rest}"
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"route {name}: {url!r} is not an http(s)://host[:port][/path] URL")
        return cls(name, url, api)


def split_items(items: Iterable[object]) -> tuple[str, ...]:
    """Repeatable flag values, each also space or comma separated (as a ``BRIDGE_*`` variable holds
    them), as one flat tuple of the non-empty pieces."""
    return tuple(p for item in items for p in str(item).replace(",", " ").split())


def parse_routes(items: Iterable[str]) -> tuple[Route, ...]:
    """``NAME=URL[,URL...]`` items (space or comma separated, repeatable) into routes; a name may
    come back with several URLs (replicas), e.g. ``ollama=http://127.0.0.1:11434,http://127.0.0.1:11435``.
    A piece without ``=`` is one more upstream of the route before it (with its API, e.g.
    ``ollama=openai+http://a,http://b``); all upstreams of a route speak the same API."""
    routes: list[Route] = []
    for piece in split_items(items):
        if "=" not in piece:
            if not routes:
                raise ConfigError(f"route {piece!r}: expected NAME=URL")
            before = routes[-1]
            api = f"{before.api}+" if before.api and "+" not in piece.partition("://")[0] else ""
            piece = f"{before.name}={api}{piece}"
        route = Route.parse(piece)
        if any(r.name == route.name and r.url == route.url for r in routes):
            raise ConfigError(f"route {route.name}: {route.url} given twice")
        if any(r.name == route.name and r.api != route.api for r in routes):
            raise ConfigError(f"route {route.name}: its upstreams must all speak the same API")
        routes.append(route)
    return tuple(routes)


def parse_route_ports(items: Iterable[str]) -> dict[int, str]:
    """``ROUTE=PORT`` pairs -> {port: route}."""
    out: dict[int, str] = {}
    for piece in split_items(items):
        name, sep, port = piece.partition("=")
        if not sep or not ROUTE_NAME.match(name) or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"route port {piece!r}: expected ROUTE=PORT")
        out[int(port)] = name
    return out


def valid_node_name(name: str) -> bool:
    """Whether ``name`` may name a node: 1-64 characters of ``A-Z a-z 0-9 . _ -``."""
    return bool(NODE_NAME.fullmatch(name))


def node_name_from(text: str) -> str:
    """A valid node name made from ``text`` (a host name, a client address): every other character
    becomes ``-``, cut to 64; ``node`` when nothing is left."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", text)[:64].strip("-")
    return name or "node"


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) into its parts."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"listen address {text!r}: expected HOST:PORT")
    return host, int(port)


def relay_url(text: str, scheme: str) -> str:
    """The relay's URL (``ws(s)://`` or ``http(s)://``, one name for both: ``--relay``,
    ``BRIDGE_RELAY``) in the scheme family a user of it needs: ``"ws"`` for the bridge's WebSocket,
    ``"http"`` for clients; no trailing slash."""
    base = text.strip().rstrip("/")
    kind, sep, rest = base.partition("://")
    secure = {"ws": False, "http": False, "wss": True, "https": True}.get(kind.lower())
    if not sep or secure is None or not rest:
        raise ConfigError(f"relay {text!r}: expected ws://, wss://, http:// or https://")
    return f"{scheme}{'s' if secure else ''}://{rest}"


def parse_networks(items: Iterable[str]) -> tuple[IPv4Network | IPv6Network, ...]:
    """Addresses or CIDR ranges (``--trusted-proxy``, space or comma separated) as networks."""
    out: list[IPv4Network | IPv6Network] = []
    for piece in split_items(items):
        try:
            out.append(ip_network(piece, strict=False))
        except ValueError:
            raise ConfigError(f"trusted proxy {piece!r}: expected an IP address or a CIDR range") from None
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RelayConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path(".data/relay")
    node_token: str = ""  # empty: generated on first start and kept in the data directory
    api_keys: tuple[str, ...] = ()
    grace: float = 30.0  # seconds a request waits for a bridge before 503
    heartbeat: float = 5.0  # seconds between the bridge's pings; silence for 3x closes the link
    default_route: str = "webui"
    route_ports: dict[int, str] = field(default_factory=dict)
    max_body: int = 0  # bytes; 0 = unlimited (streamed, never buffered)
    drain_timeout: float = 30.0
    window: int = DEFAULT_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_streams: int = DEFAULT_MAX_STREAMS
    login_rate: int = 10  # failed logins per client address per minute before 429
    key_rate: float = 0.0  # requests a second per client key, sustained (0: no limit)
    key_burst: int = 0  # requests a key may make at once above key_rate (0: 10 x key_rate, at least 1)
    body_timeout: float = 60.0  # seconds a request body may stall (no byte) before 408 (0: no limit)
    # Idempotent retries: a repeated request (same client key and Idempotency-Key, or the same
    # deterministic body) joins the generation in flight or gets its answer for this long.
    idempotency_ttl: float = 300.0  # seconds; 0 turns joining off
    idempotency_entries: int = 256  # responses kept at most (all keys together)
    shared_max_bytes: int = 8 * 1024 * 1024  # largest response kept for joiners or a job
    job_ttl: float = 86400.0  # seconds a finished job's result is kept in the data directory
    # Browsers (docs/security.md §5, §6): origins besides the relay's own whose pages may write with
    # the session cookie or open its WebSockets; routes besides the default one that get cookies.
    allowed_origins: tuple[str, ...] = ()
    cookie_routes: tuple[str, ...] = ()
    # Issue 16's resource limits (docs/security.md §7): what one client key, or an outsider, may hold.
    #: Peers whose X-Forwarded-For is believed (addresses or CIDR ranges); none by default.
    trusted_proxies: tuple[str, ...] = ()
    idempotency_bytes: int = 64 * 1024 * 1024  # repeated-request answers kept, all keys together
    job_quota: int = 100  # jobs one key may keep (running or finished); 0: no limit
    job_bytes: int = 64 * 1024 * 1024  # stored job results one key may hold; 0: no limit
    key_streams: int = 64  # requests, WebSockets and running jobs one key may have at once; 0: off

    # The route whose requests carry the client's identity (X-Bridge-User-Email/-Name, for Open
    # WebUI's trusted-header sign-in): "" = the default route, "-" = none.
    user_route: str = ""

    def __post_init__(self) -> None:
        parse_networks(self.trusted_proxies)
        # A right credential is accepted even from an address over its failure limit (docs/security.md
        # §3, §7): guessing must be hopeless by the secret's size, so an operator's own are long.
        if self.node_token and len(self.node_token) < MIN_SECRET:
            raise ConfigError(
                f"the node token is {len(self.node_token)} characters: at least {MIN_SECRET} random ones "
                "are required (leave it empty and the relay makes one: `bridge token`)"
            )
        short = [k for k in self.api_keys if len(k) < MIN_SECRET]
        if short:
            raise ConfigError(
                f"{len(short)} of the client keys given (BRIDGE_API_KEYS) are shorter than {MIN_SECRET} "
                "characters: use `bridge keys add`, or longer random keys"
            )

    @property
    def identity_route(self) -> str | None:
        """The route that gets ``X-Bridge-User-*`` headers (see ``user_route``), or None."""
        if self.user_route == "-":
            return None
        return self.user_route or self.default_route or None


#: The ways a route's replicas can share requests (``--balance``).
BALANCE_POLICIES = ("affinity", "least", "round-robin")


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """Everything the bridge (``bridge connect``) is told: the relay, the routes, the link's timing,
    and its local side (the local endpoint, metering, sampling). Checked when made."""

    relay: str = "ws://127.0.0.1:8000"
    routes: tuple[Route, ...] = ()
    node_token: str = ""
    node_name: str = ""
    connect_timeout: float = 10.0  # seconds to open the WebSocket / the upstream connection
    backoff_initial: float = 0.5
    backoff_max: float = 5.0
    drain_timeout: float = 30.0
    window: int = DEFAULT_WINDOW
    max_frame: int = DEFAULT_MAX_FRAME
    max_streams: int = DEFAULT_MAX_STREAMS
    #: ``HOST:PORT`` of the local endpoint ("" = none; port 0 = any free port, logged).
    listen: str = ""
    #: Key the local endpoint requires (``Authorization: Bearer`` or ``X-Bridge-Key``); required
    #: when ``listen`` is not a loopback address.
    listen_key: str = ""
    #: Route served at ``/`` of the local endpoint ("" = the first route).
    default_route: str = ""
    #: Directory of the JSONL log (None = no log file).
    metrics_dir: Path | None = None
    #: Seconds between GPU/host samples (0 = no sampling).
    sample_interval: float = 5.0
    #: Told to the relay as a node fact (``split``, ``replicas``, ...).
    gpu_mode: str = ""
    #: Most STATS ``request`` frames a second (bursts of 10x); the JSONL log keeps every record.
    stats_rate: float = 20.0
    #: How a route's replicas share requests: ``affinity`` (a conversation's turns to the replica
    #: that served its previous turn, else least outstanding), ``least`` (least outstanding
    #: requests) or ``round-robin`` (in turn, whatever the load); see bridge/affinity.py.
    balance: str = "affinity"

    def __post_init__(self) -> None:
        relay_url(self.relay, "ws")
        if self.node_name and not valid_node_name(self.node_name):
            raise ConfigError(
                f"node name {self.node_name[:80]!r}: expected 1-64 characters of A-Z a-z 0-9 . _ -"
            )
        if self.balance not in BALANCE_POLICIES:
            raise ConfigError(f"unknown balance {self.balance!r}: one of {', '.join(BALANCE_POLICIES)}")
        if self.default_route and self.default_route not in self.route_names:
            raise ConfigError(f"default route {self.default_route!r} is not one of the routes")
        if self.listen:
            host, _port = parse_listen(self.listen)
            if not is_loopback(host) and not self.listen_key:
                raise ConfigError(
                    f"refusing --listen {self.listen} without --listen-key (BRIDGE_LISTEN_KEY): only a "
                    "loopback address may go without a key"
                )

    @property
    def connect_url(self) -> str:
        """The relay's WebSocket endpoint for bridges."""
        return relay_url(self.relay, "ws") + "/_relay/connect"

    @property
    def route_names(self) -> list[str]:
        """Each route's name once, in the order given (HELLO lists them)."""
        return list(dict.fromkeys(r.name for r in self.routes))

    @property
    def served_at_root(self) -> str:
        """The route the local endpoint serves at ``/``."""
        return self.default_route or (self.routes[0].name if self.routes else "")
