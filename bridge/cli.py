"""The ``bridge`` command. Every flag is also an environment variable with the ``BRIDGE_`` prefix
(shown in ``--help``); a flag given on the command line wins over the variable."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from ._auth import hash_key, new_key
from ._config import BridgeConfig, RelayConfig, parse_route_ports, parse_routes
from ._store import Store
from .errors import AuthError, ConfigError

DEFAULT_ROUTES = ("ollama=http://127.0.0.1:11434", "webui=http://127.0.0.1:8080")


def _run(main: Coroutine[Any, Any, None]) -> None:
    """Run the relay or the bridge on uvloop where it is installed (it comes with uvicorn[standard]
    on Linux; about a fifth less CPU per forwarded request here), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("websockets").setLevel(logging.WARNING)


F = TypeVar("F", bound=Callable[..., Any])


def _opt(*names: str, env: str, **kw: Any) -> Callable[[F], F]:
    return click.option(*names, envvar=f"BRIDGE_{env}", show_envvar=True, **kw)


log_level = _opt(
    "--log-level",
    env="LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
data_dir = _opt(
    "--data-dir",
    env="DATA_DIR",
    default=".data/relay",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the relay keeps its SQLite state.",
)
node_token = _opt(
    "--node-token",
    env="NODE_TOKEN",
    default="",
    help="Shared secret the bridge presents to the relay. Relay: generated and kept in the "
    "data directory when empty (see `bridge token`).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bridge")
def main() -> None:
    """A relay (public) and a bridge (in the notebook) joined by one outbound WebSocket."""


def _relay_options(f: Any) -> Any:
    for decorator in reversed(
        [
            _opt("--host", env="HOST", default="127.0.0.1", show_default=True, help="Address to listen on."),
            _opt("--port", env="PORT", default=8000, show_default=True, type=int, help="Port to listen on."),
            data_dir,
            node_token,
            _opt(
                "--api-keys",
                env="API_KEYS",
                default="",
                help="Comma-separated client keys accepted besides those made with `bridge keys`.",
            ),
            _opt(
                "--grace",
                env="GRACE",
                default=30.0,
                show_default=True,
                type=float,
                help="Seconds a request waits for a bridge to connect before 503.",
            ),
            _opt(
                "--heartbeat",
                env="HEARTBEAT",
                default=5.0,
                show_default=True,
                type=float,
                help="Seconds between heartbeats; three silent intervals close the link.",
            ),
            _opt(
                "--default-route",
                env="DEFAULT_ROUTE",
                default="webui",
                show_default=True,
                help="Route served at the root of the relay's host.",
            ),
            _opt(
                "--route-port",
                env="ROUTE_PORT",
                multiple=True,
                help="ROUTE=PORT: also serve ROUTE at the root of PORT (repeatable).",
            ),
            _opt(
                "--max-body",
                env="MAX_BODY",
                default=0,
                show_default=True,
                type=int,
                help="Largest request body in bytes (0: no limit; bodies are streamed, never buffered).",
            ),
            _opt(
                "--drain-timeout",
                env="DRAIN_TIMEOUT",
                default=30.0,
                show_default=True,
                type=float,
                help="Seconds to let requests in flight finish on SIGINT/SIGTERM.",
            ),
            _opt(
                "--idempotency-ttl",
                env="IDEMPOTENCY_TTL",
                default=300.0,
                show_default=True,
                type=float,
                help="Seconds a repeated request (same key + Idempotency-Key, or same deterministic body) "
                "joins the generation in flight or gets its answer (0: off).",
            ),
            _opt(
                "--idempotency-entries",
                env="IDEMPOTENCY_ENTRIES",
                default=256,
                show_default=True,
                type=int,
                help="Most responses kept for idempotent retries.",
            ),
            _opt(
                "--job-ttl",
                env="JOB_TTL",
                default=86400.0,
                show_default=True,
                type=float,
                help="Seconds a finished job's result (/_relay/jobs) is kept.",
            ),
            _opt(
                "--body-timeout",
                env="BODY_TIMEOUT",
                default=60.0,
                show_default=True,
                type=float,
                help="Seconds a request body may stall (no byte received) before 408 (0: no limit).",
            ),
            _opt(
                "--key-rate",
                env="KEY_RATE",
                default=0.0,
                show_default=True,
                type=float,
                help="Requests a second each client key may make, sustained; beyond: 429 (0: no limit).",
            ),
            _opt(
                "--key-burst",
                env="KEY_BURST",
                default=0,
                show_default=True,
                type=int,
                help="Requests a key may make at once above --key-rate (0: 10 x the rate).",
            ),
        ]
    ):
        f = decorator(f)
    return f


def _relay_config(kw: dict[str, Any]) -> RelayConfig:
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
    )


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    raise SystemExit(2)


@main.command()
@_relay_options
@log_level
def relay(log_level: str, **kw: Any) -> None:
    """Run the public relay."""
    _setup_logging(log_level)
    from .relay import ensure_first_key, serve

    try:
        config = _relay_config(kw)
        store = Store(config.data_dir)
        first = ensure_first_key(store, config)
        store.close()
    except ConfigError as exc:
        _fail(exc)
        return

    def ready(_relay: Any, ports: list[int]) -> None:
        url = f"http://{_display_host(config.host)}:{ports[0]}"
        click.echo(
            f"relay listening on {url}  (bridges connect to ws://{_display_host(config.host)}:{ports[0]})"
        )
        for port, route in config.route_ports.items():
            click.echo(f"  route {route} also at http://{_display_host(config.host)}:{port}/")
        if first:
            click.echo(f"client key (shown once, keep it): {first}")
        if not config.node_token:
            click.echo(
                f"node token: stored in {config.data_dir}; print it with `bridge token --data-dir "
                f"{config.data_dir}`"
            )

    _run(serve(config, ready=ready))


@main.command()
@_opt(
    "--relay",
    "relay_url",
    env="RELAY",
    default="ws://127.0.0.1:8000",
    show_default=True,
    help="The relay's URL: ws(s):// or http(s)://.",
)
@_opt(
    "--route",
    env="ROUTE",
    multiple=True,
    help="NAME=URL[,URL...] of an upstream to offer (repeatable); several URLs are replicas, "
    f"balanced by least outstanding requests. Default: {' '.join(DEFAULT_ROUTES)}",
)
@node_token
@_opt(
    "--node-name", env="NODE_NAME", default="", help="Name shown in the relay's status (default: hostname)."
)
@_opt(
    "--connect-timeout",
    env="CONNECT_TIMEOUT",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds to open the relay WebSocket or an upstream connection.",
)
@_opt(
    "--backoff-max",
    env="BACKOFF_MAX",
    default=5.0,
    show_default=True,
    type=float,
    help="Longest wait between reconnection attempts (exponential backoff with jitter).",
)
@_opt(
    "--drain-timeout",
    env="DRAIN_TIMEOUT",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to let streams in flight finish on SIGINT/SIGTERM.",
)
@_opt(
    "--listen",
    env="LISTEN",
    default="",
    help="HOST:PORT of a local endpoint serving the routes at /r/<route>/ and the default route at / "
    "(e.g. for Open WebUI to reach the engine through the bridge's metering and balancing).",
)
@_opt(
    "--listen-key",
    env="LISTEN_KEY",
    default="",
    help="Key the local endpoint requires (Bearer or X-Bridge-Key); needed for a non-loopback --listen.",
)
@_opt(
    "--default-route",
    env="DEFAULT_ROUTE",
    default="",
    help="Route served at / of the local endpoint (default: the first route).",
)
@_opt(
    "--metrics-dir",
    env="METRICS_DIR",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the append-only JSONL log of requests and GPU/host samples.",
)
@_opt(
    "--sample-interval",
    env="SAMPLE_INTERVAL",
    default=5.0,
    show_default=True,
    type=float,
    help="Seconds between GPU (NVML) and host samples (0: none).",
)
@_opt("--gpu-mode", env="GPU_MODE", default="", help="Reported to the relay and in validation runs.")
@log_level
def connect(
    relay_url: str,
    route: tuple[str, ...],
    node_token: str,
    node_name: str,
    connect_timeout: float,
    backoff_max: float,
    drain_timeout: float,
    listen: str,
    listen_key: str,
    default_route: str,
    metrics_dir: Path | None,
    sample_interval: float,
    gpu_mode: str,
    log_level: str,
) -> None:
    """Run the bridge: dial the relay and serve its requests from the routes."""
    _setup_logging(log_level)
    from ._http import is_loopback
    from .node import BridgeOptions, parse_listen, parse_routes_multi
    from .node import connect as run_bridge

    try:
        if listen:
            host, _port = parse_listen(listen)
            if not is_loopback(host) and not listen_key:
                raise ConfigError(
                    f"refusing --listen {listen} without --listen-key: only a loopback address may go "
                    "without a key"
                )
        options = BridgeOptions(
            listen=listen,
            listen_key=listen_key,
            default_route=default_route,
            metrics_dir=metrics_dir,
            sample_interval=sample_interval,
            gpu_mode=gpu_mode,
        )
        config = BridgeConfig(
            relay=relay_url,
            routes=parse_routes_multi(route or DEFAULT_ROUTES),
            node_token=node_token,
            node_name=node_name,
            connect_timeout=connect_timeout,
            backoff_max=backoff_max,
            drain_timeout=drain_timeout,
        )
        config.connect_url  # noqa: B018 - validates the URL now
        if not node_token:
            raise ConfigError("a node token is required (--node-token or BRIDGE_NODE_TOKEN)")
        _run(run_bridge(config, options))
    except (ConfigError, AuthError) as exc:
        _fail(exc)


@main.command()
@_relay_options
@_opt(
    "--route",
    env="ROUTE",
    multiple=True,
    help=f"NAME=URL of an upstream (repeatable). Default: {' '.join(DEFAULT_ROUTES)}",
)
@log_level
def up(route: tuple[str, ...], log_level: str, **kw: Any) -> None:
    """Relay + bridge in one process, in front of the given upstreams; prints the URL and a key."""
    _setup_logging(log_level)
    from .node import Bridge
    from .relay import serve

    try:
        routes = parse_routes(route or DEFAULT_ROUTES)
        config = _relay_config(kw)
        store = Store(config.data_dir)
        for record in store.list_keys():
            if record.label == "bridge up" and record.revoked is None:
                store.revoke_key(record.id)
        key, key_id = new_key()
        store.add_key(key_id, hash_key(key), "bridge up")
        token = config.node_token or store.secret("node_token")
        store.close()
    except ConfigError as exc:
        _fail(exc)
        return

    async def run() -> None:
        bridge: Bridge | None = None

        def ready(_relay: Any, ports: list[int]) -> None:
            nonlocal bridge
            host = _display_host(config.host)
            url = f"http://{host}:{ports[0]}"
            bridge = Bridge(BridgeConfig(relay=url, routes=routes, node_token=token, node_name="local"))
            task = asyncio.get_running_loop().create_task(bridge.run())
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
            click.echo(
                f"\n  relay:  {url}/   (Open WebUI at / when the route '{config.default_route}' exists)"
            )
            for r in routes:
                click.echo(f"  route:  {url}/r/{r.name}/  ->  {r.url}")
            click.echo(f"  key:    {key}")
            click.echo(f"  try:    curl -H 'Authorization: Bearer {key}' {url}/r/{routes[0].name}/\n")

        await serve(config, ready=ready)
        if bridge is not None:
            bridge.stop()

    _run(run())


@main.command()
@_opt("--relay-url", env="RELAY_URL", default="", help="The relay's public URL, http(s)://.")
@_opt("--key", env="KEY", default="", help="A client key for the relay.")
@_opt("--model", env="MODEL", default="", help="The model to validate (e.g. qwen3:8b).")
@_opt(
    "--out",
    env="OUT",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for report.md, results.json and the plots.",
)
@_opt("--suite", env="SUITE", default="v1", show_default=True, help="Prompt suite: a name or a JSON file.")
@_opt("--repetitions", env="REPETITIONS", default=None, type=int, help="Repetitions (default: the suite's).")
@_opt("--concurrency", env="CONCURRENCY", default="", help="Comma-separated levels (default: the suite's).")
@_opt("--seed", env="SEED", default=None, type=int, help="Sampling seed (default: the suite's).")
@_opt("--route", "route_name", env="VALIDATE_ROUTE", default="ollama", show_default=True, help="Relay route.")
@_opt(
    "--api",
    env="API",
    default="ollama",
    show_default=True,
    type=click.Choice(["ollama", "openai"]),
    help="Client: Ollama's API or the OpenAI-compatible one.",
)
@_opt("--gpu-mode", env="GPU_MODE", default="", help="Label the run (split, replicas, ...).")
@_opt(
    "--bridge-log",
    env="METRICS_DIR",
    default=None,
    type=click.Path(dir_okay=True, path_type=Path),
    help="The bridge's --metrics-dir (or its JSONL file) to join per request, on the bridge's machine.",
)
@_opt("--case", "cases", env="CASES", multiple=True, help="Only this case id (repeatable).")
@_opt(
    "--compare",
    env="COMPARE",
    nargs=2,
    default=None,
    type=click.Path(exists=True, path_type=Path),
    help="Compare two finished runs (folders) side by side instead of running.",
)
@log_level
def validate(
    relay_url: str,
    key: str,
    model: str,
    out: Path | None,
    suite: str,
    repetitions: int | None,
    concurrency: str,
    seed: int | None,
    route_name: str,
    api: str,
    gpu_mode: str,
    bridge_log: Path | None,
    cases: tuple[str, ...],
    compare: tuple[Path, Path] | None,
    log_level: str,
) -> None:
    """A reproducible validation run through the relay: report.md, results.json and plots."""
    _setup_logging(log_level)
    from .metrics import LOG_NAME
    from .report import compare as compare_runs
    from .validate import Settings
    from .validate import run as run_validation

    try:
        if compare:
            click.echo(compare_runs(compare[0], compare[1], out))
            if out is not None:
                click.echo(f"written: {out / 'compare.md'}")
            return
        missing = [n for n, v in (("--relay-url", relay_url), ("--key", key), ("--model", model)) if not v]
        if missing or out is None:
            raise ConfigError(f"missing {', '.join(missing + ([] if out else ['--out']))}")
        try:
            levels = tuple(int(c) for c in concurrency.replace(" ", "").split(",") if c) or None
        except ValueError:
            raise ConfigError(f"--concurrency {concurrency!r}: expected numbers like 1,2,4,8") from None
        if bridge_log is not None and bridge_log.is_dir():
            bridge_log = bridge_log / LOG_NAME
        data = run_validation(
            Settings(
                relay_url=relay_url,
                key=key,
                model=model,
                out=out,
                suite=suite,
                route=route_name,
                api=api,
                repetitions=repetitions,
                concurrency=levels,
                seed=seed,
                gpu_mode=gpu_mode,
                bridge_log=bridge_log,
                cases=cases,
            )
        )
        failed = sum(1 for r in data["requests"] if not r["ok"])
        click.echo(f"validation {data['run_id']}: {len(data['requests'])} requests, {failed} failed")
        click.echo(f"report: {out / 'report.md'}")
        if failed:
            raise SystemExit(1)
    except ConfigError as exc:
        _fail(exc)


@main.command()
@data_dir
def token(data_dir: Path) -> None:
    """Print the relay's node token (generated on first use)."""
    store = Store(data_dir)
    click.echo(store.secret("node_token"))
    store.close()


@main.group()
def keys() -> None:
    """Manage client keys (stored hashed in the relay's data directory)."""


@keys.command("add")
@data_dir
@click.option("--label", default="", help="A note to recognise the key by.")
def keys_add(data_dir: Path, label: str) -> None:
    """Create a key and print it (the only time it is shown)."""
    store = Store(data_dir)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), label)
    store.close()
    click.echo(key)
    click.echo(f"(id {key_id}; a running relay picks it up within a few seconds)", err=True)


@keys.command("list")
@data_dir
def keys_list(data_dir: Path) -> None:
    """List keys by id (never the secret)."""
    store = Store(data_dir)
    for record in store.list_keys():
        state = "revoked " + _when(record.revoked) if record.revoked else "active"
        click.echo(f"{record.id}  {_when(record.created)}  {state:<28}  {record.label}")
    store.close()


@keys.command("revoke")
@data_dir
@click.argument("key_id")
def keys_revoke(data_dir: Path, key_id: str) -> None:
    """Revoke a key by id."""
    store = Store(data_dir)
    ok = store.revoke_key(key_id)
    store.close()
    if not ok:
        _fail(ConfigError(f"no active key with id {key_id}"))
    click.echo(f"revoked {key_id}")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
