"""What every ``bridge`` command shares: flags that are also ``BRIDGE_*`` environment variables
(shown in ``--help``; a flag given on the command line wins), the relay's flags and the config they
make, logging, the event loop, and how a command fails."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from .config import RelayConfig, parse_route_ports, split_items

#: The cyclic garbage collector's thresholds while serving: a young collection once 20,000 more
#: container objects exist than were freed (CPython's default: 700), the older ones as by default.
GC_THRESHOLD = (20_000, 10, 10)


def tune_gc() -> None:
    """Keep Python's cyclic garbage collector off the request path. Everything made so far (the
    modules, the configuration: tens of thousands of objects that live as long as the process) is
    moved out of its sight (``gc.freeze``, what CPython's documentation suggests for servers), and
    young collections wait for :data:`GC_THRESHOLD`. Reference counting frees what requests leave
    behind (they leave no cycles: tests/test_stream.py, tests/test_http1.py); the collector is only
    for cycles, which it still finds, later.

    Measured with ``gc.callbacks`` (2026-12-03, 3,200 small GETs at 64 concurrent): with the
    defaults the relay spent 52 ms in the collector, one full collection of 12 ms among them, and
    the bridge 41 ms, its full collection 19 ms (a pause every request and stream in flight felt);
    with both, none. Paired against the code before (``run.py --baseline-src``, 3 rounds each):
    freezing, p99 0.54x at c=1 and 0.69x at c=64; the threshold on top, c=64 1.11x the requests/s
    at 0.86x the CPU, p99 0.75x. Memory with 1,000 open streams unchanged (1.00x, 1.01x) once the
    streams a client left no longer stayed in cycles (before that fix the threshold cost the
    bridge 1.28x)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run the relay or the bridge on uvloop where it is installed (it comes with uvicorn[standard]
    on Linux; about a fifth less CPU per forwarded request here), else on asyncio's own loop; the
    garbage collector tuned first (:func:`tune_gc`)."""
    tune_gc()
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)


F = TypeVar("F", bound=Callable[..., Any])
#: The type of an option that names a folder (a Path; None when the option is not given).
FOLDER = click.Path(file_okay=False, path_type=Path)


def opt(*names: str, env: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*names, envvar=f"BRIDGE_{env}", show_envvar=True, **kw)


log_level = opt(
    "--log-level",
    env="LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
data_dir = opt(
    "--data-dir",
    env="DATA_DIR",
    default=".data/relay",
    show_default=True,
    type=FOLDER,
    help="Where the relay keeps its SQLite state.",
)
node_token = opt(
    "--node-token",
    env="NODE_TOKEN",
    default="",
    help="Shared secret the bridge presents to the relay. Relay: generated and kept in the "
    "data directory when empty (see `bridge token`).",
)


def relay_options(f: Any) -> Any:
    for decorator in reversed(
        [
            opt("--host", env="HOST", default="127.0.0.1", show_default=True, help="Address to listen on."),
            opt("--port", env="PORT", default=8000, show_default=True, type=int, help="Port to listen on."),
            data_dir,
            node_token,
            opt(
                "--api-keys",
                env="API_KEYS",
                default="",
                help="Comma-separated client keys accepted besides those made with `bridge keys`.",
            ),
            opt(
                "--grace",
                env="GRACE",
                default=30.0,
                show_default=True,
                type=float,
                help="Seconds a request waits for a bridge to connect before 503.",
            ),
            opt(
                "--heartbeat",
                env="HEARTBEAT",
                default=5.0,
                show_default=True,
                type=float,
                help="Seconds between heartbeats; three silent intervals close the link.",
            ),
            opt(
                "--default-route",
                env="DEFAULT_ROUTE",
                default="webui",
                show_default=True,
                help="Route served at the root of the relay's host.",
            ),
            opt(
                "--route-port",
                env="ROUTE_PORT",
                multiple=True,
                help="ROUTE=PORT: also serve ROUTE at the root of PORT (repeatable).",
            ),
            opt(
                "--max-body",
                env="MAX_BODY",
                default=0,
                show_default=True,
                type=int,
                help="Largest request body in bytes (0: no limit; bodies are streamed, never buffered).",
            ),
            opt(
                "--drain-timeout",
                env="DRAIN_TIMEOUT",
                default=30.0,
                show_default=True,
                type=float,
                help="Seconds to let requests in flight finish on SIGINT/SIGTERM.",
            ),
            opt(
                "--idempotency-ttl",
                env="IDEMPOTENCY_TTL",
                default=300.0,
                show_default=True,
                type=float,
                help="Seconds a repeated request (same key + Idempotency-Key, or same deterministic body) "
                "joins the generation in flight or gets its answer (0: off).",
            ),
            opt(
                "--idempotency-entries",
                env="IDEMPOTENCY_ENTRIES",
                default=256,
                show_default=True,
                type=int,
                help="Most responses kept for idempotent retries.",
            ),
            opt(
                "--job-ttl",
                env="JOB_TTL",
                default=86400.0,
                show_default=True,
                type=float,
                help="Seconds a finished job's result (/_relay/jobs) is kept.",
            ),
            opt(
                "--body-timeout",
                env="BODY_TIMEOUT",
                default=60.0,
                show_default=True,
                type=float,
                help="Seconds a request body may stall (no byte received) before 408 (0: no limit).",
            ),
            opt(
                "--key-rate",
                env="KEY_RATE",
                default=0.0,
                show_default=True,
                type=float,
                help="Requests a second each client key may make, sustained; beyond: 429 (0: no limit).",
            ),
            opt(
                "--user-route",
                env="USER_ROUTE",
                default="",
                help="The route whose requests tell the upstream who the client is: X-Bridge-User-Email "
                "(<key id>@relay.invalid) and X-Bridge-User-Name (the key's label), for Open WebUI's "
                "trusted-header sign-in; clients' own X-Bridge-User-* headers are dropped on every "
                "route. Default: the default route; '-': none.",
            ),
            opt(
                "--key-burst",
                env="KEY_BURST",
                default=0,
                show_default=True,
                type=int,
                help="Requests a key may make at once above --key-rate (0: 10 x the rate).",
            ),
            opt(
                "--allowed-origin",
                env="ALLOWED_ORIGIN",
                multiple=True,
                help="An origin (scheme://host[:port]) besides the relay's own whose pages may write "
                "with the login cookie or open its WebSockets (repeatable; docs/security.md §6).",
            ),
            opt(
                "--cookie-route",
                env="COOKIE_ROUTE",
                multiple=True,
                help="A route under /r/ (or a --route-port) that receives the browser's cookies, as "
                "the default route does (repeatable; default: none).",
            ),
            # Issue 16's resource limits (docs/security.md §7).
            opt(
                "--trusted-proxy",
                env="TRUSTED_PROXY",
                multiple=True,
                help="Address or CIDR range of a proxy in front whose X-Forwarded-For is believed "
                "(repeatable, or comma-separated; default: none).",
            ),
            opt(
                "--idempotency-bytes",
                env="IDEMPOTENCY_BYTES",
                default=64 * 1024 * 1024,
                show_default=True,
                type=int,
                help="Bytes of answers kept for repeated requests, all keys together.",
            ),
            opt(
                "--job-quota",
                env="JOB_QUOTA",
                default=100,
                show_default=True,
                type=int,
                help="Jobs one client key may keep, running or finished; beyond: 429 (0: no limit).",
            ),
            opt(
                "--job-bytes",
                env="JOB_BYTES",
                default=64 * 1024 * 1024,
                show_default=True,
                type=int,
                help="Bytes of job results one client key may keep; at or over it: 429 (0: no limit).",
            ),
            opt(
                "--key-streams",
                env="KEY_STREAMS",
                default=64,
                show_default=True,
                type=int,
                help="Requests, WebSockets and running jobs one client key may have at once; "
                "beyond: 429 (0: no limit).",
            ),
        ]
    ):
        f = decorator(f)
    return f


def relay_config(kw: dict[str, Any]) -> RelayConfig:
    return RelayConfig(
        host=kw["host"],
        port=kw["port"],
        data_dir=kw["data_dir"],
        node_token=kw["node_token"],
        api_keys=tuple(k.strip() for k in kw["api_keys"].split(",") if k.strip()),
        grace=kw["grace"],
        heartbeat=kw["heartbeat"],
        default_route=kw["default_route"],
        route_ports=parse_route_ports(kw["route_port"]),
        max_body=kw["max_body"],
        drain_timeout=kw["drain_timeout"],
        idempotency_ttl=kw["idempotency_ttl"],
        idempotency_entries=kw["idempotency_entries"],
        job_ttl=kw["job_ttl"],
        key_rate=kw["key_rate"],
        key_burst=kw["key_burst"],
        body_timeout=kw["body_timeout"],
        allowed_origins=_items(kw.get("allowed_origin", ())),
        cookie_routes=_items(kw.get("cookie_route", ())),
        trusted_proxies=tuple(kw["trusted_proxy"]),
        idempotency_bytes=kw["idempotency_bytes"],
        job_quota=kw["job_quota"],
        job_bytes=kw["job_bytes"],
        key_streams=kw["key_streams"],
        user_route=kw["user_route"],
    )


def _items(values: Any) -> tuple[str, ...]:
    """Repeatable flag values, each also space or comma separated (as a ``BRIDGE_*`` variable)."""
    return split_items(values or ())


def fail(exc: Exception) -> NoReturn:
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(2)


def display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
