"""Configuration as small typed value objects (the CLI builds them from flags and BRIDGE_* variables)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigError
from .wire.constants import DEFAULT_MAX_FRAME, DEFAULT_MAX_STREAMS, DEFAULT_WINDOW

ROUTE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


@dataclass(frozen=True, slots=True)
class Route:
    """A named upstream the bridge forwards to: ``name=http://host:port[/base]``."""

    name: str
    url: str

    @classmethod
    def parse(cls, text: str) -> Route:
        name, sep, url = text.partition("=")
        name = name.strip().lower()
        url = url.strip().rstrip("/")
        if not sep or not ROUTE_NAME.match(name):
            raise ConfigError(f"route {text!r}: expected NAME=URL with NAME made of a-z, 0-9, '-', '_'")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ConfigError(f"route {name}: {url!r} is not an http(s)://host[:port][/path] URL")
        return cls(name, url)


def parse_routes(items: Iterable[str]) -> tuple[Route, ...]:
    routes: dict[str, Route] = {}
    for item in items:
        for piece in item.replace(",", " ").split():
            route = Route.parse(piece)
            if route.name in routes:
                raise ConfigError(f"route {route.name} given twice")
            routes[route.name] = route
    return tuple(routes.values())


def parse_route_ports(items: Iterable[str]) -> dict[int, str]:
    """``ROUTE=PORT`` pairs -> {port: route}."""
    out: dict[int, str] = {}
    for item in items:
        for piece in item.replace(",", " ").split():
            name, sep, port = piece.partition("=")
            if not sep or not ROUTE_NAME.match(name) or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"route port {piece!r}: expected ROUTE=PORT")
            out[int(port)] = name
    return out


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


@dataclass(frozen=True, slots=True)
class BridgeConfig:
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

    @property
    def connect_url(self) -> str:
        base = self.relay.rstrip("/")
        if base.startswith("http://"):
            base = "ws://" + base[len("http://") :]
        elif base.startswith("https://"):
            base = "wss://" + base[len("https://") :]
        if not base.startswith(("ws://", "wss://")):
            raise ConfigError(f"relay {self.relay!r}: expected ws://, wss://, http:// or https://")
        return base + "/_relay/connect"
