"""The ``bridge`` command. Every flag is also an environment variable with the ``BRIDGE_`` prefix
(shown in ``--help``); a flag given on the command line wins over the variable."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import BALANCE_POLICIES, DEFAULT_ROUTES, BridgeConfig, parse_routes
from .deploy._cli import deploy as deploy_commands
from .errors import AuthError, ConfigError
from .options import (
    FOLDER,
    data_dir,
    display_host,
    fail,
    log_level,
    node_token,
    opt,
    relay_config,
    relay_options,
    run,
    setup_logging,
)
from .relay.auth import hash_key, new_key
from .relay.store import Store
from .validate.cli import validate


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="bridge")
def main() -> None:
    """A relay (public) and a bridge (in the notebook) joined by one outbound WebSocket."""


main.add_command(validate)
main.add_command(deploy_commands)  # `bridge deploy cloudflare` (bridge/deploy/_cli.py)


@main.command()
@relay_options
@log_level
def relay(log_level: str, **kw: Any) -> None:
    """Run the public relay."""
    setup_logging(log_level)
    from .relay.server import ensure_first_key, serve

    try:
        config = relay_config(kw)
        store = Store(config.data_dir)
        first = ensure_first_key(store, config)
        store.close()
    except ConfigError as exc:
        fail(exc)

    def ready(_relay: Any, ports: list[int]) -> None:
        url = f"http://{display_host(config.host)}:{ports[0]}"
        click.echo(
            f"relay listening on {url}  (bridges connect to ws://{display_host(config.host)}:{ports[0]})"
        )
        for port, route in config.route_ports.items():
            click.echo(f"  route {route} also at http://{display_host(config.host)}:{port}/")
        if first:
            click.echo(f"client key (shown once, keep it): {first}")
        if not config.node_token:
            click.echo(
                f"node token: stored in {config.data_dir}; print it with `bridge token --data-dir "
                f"{config.data_dir}`"
            )

    run(serve(config, ready=ready))


@main.command()
@opt(
    "--relay",
    "relay_url",
    env="RELAY",
    default="ws://127.0.0.1:8000",
    show_default=True,
    help="The relay's URL: ws(s):// or http(s)://.",
)
@opt(
    "--route",
    env="ROUTE",
    multiple=True,
    help="NAME=URL[,URL...] of an upstream to offer (repeatable); several URLs are replicas, "
    "balanced as --balance says. NAME=openai+URL: an engine with only OpenAI's API, "
    f"in front of which the bridge serves Ollama's REST API. Default: {' '.join(DEFAULT_ROUTES)}",
)
@node_token
@opt("--node-name", env="NODE_NAME", default="", help="Name shown in the relay's status (default: hostname).")
@opt(
    "--connect-timeout",
    env="CONNECT_TIMEOUT",
    default=10.0,
    show_default=True,
    type=float,
    help="Seconds to open the relay WebSocket or an upstream connection.",
)
@opt(
    "--backoff-max",
    env="BACKOFF_MAX",
    default=5.0,
    show_default=True,
    type=float,
    help="Longest wait between reconnection attempts (exponential backoff with jitter).",
)
@opt(
    "--drain-timeout",
    env="DRAIN_TIMEOUT",
    default=30.0,
    show_default=True,
    type=float,
    help="Seconds to let streams in flight finish on SIGINT/SIGTERM.",
)
@opt(
    "--listen",
    env="LISTEN",
    default="",
    help="HOST:PORT of a local endpoint serving the routes at /r/<route>/ and the default route at / "
    "(e.g. for Open WebUI to reach the engine through the bridge's metering and balancing).",
)
@opt(
    "--listen-key",
    env="LISTEN_KEY",
    default="",
    help="Key the local endpoint requires (Bearer or X-Bridge-Key); needed for a non-loopback --listen.",
)
@opt(
    "--default-route",
    env="DEFAULT_ROUTE",
    default="",
    help="Route served at / of the local endpoint (default: the first route).",
)
@opt(
    "--metrics-dir",
    env="METRICS_DIR",
    type=FOLDER,
    help="Directory for the append-only JSONL log of requests and GPU/host samples.",
)
@opt(
    "--sample-interval",
    env="SAMPLE_INTERVAL",
    default=5.0,
    show_default=True,
    type=float,
    help="Seconds between GPU (NVML) and host samples (0: none).",
)
@opt("--gpu-mode", env="GPU_MODE", default="", help="Reported to the relay and in validation runs.")
@opt(
    "--balance",
    env="BALANCE",
    default="affinity",
    show_default=True,
    type=click.Choice(BALANCE_POLICIES),
    help="How a route's replicas share requests: affinity (a conversation's turns go to the replica "
    "that served its previous turn, else least outstanding), least (outstanding requests) or "
    "round-robin.",
)
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
    balance: str,
    log_level: str,
) -> None:
    """Run the bridge: dial the relay and serve its requests from the routes."""
    setup_logging(log_level)
    from .node.bridge import connect as run_bridge

    try:
        config = BridgeConfig(
            relay=relay_url,
            routes=parse_routes(route or DEFAULT_ROUTES),
            node_token=node_token,
            node_name=node_name,
            connect_timeout=connect_timeout,
            backoff_max=backoff_max,
            drain_timeout=drain_timeout,
            listen=listen,
            listen_key=listen_key,
            default_route=default_route,
            metrics_dir=metrics_dir,
            sample_interval=sample_interval,
            gpu_mode=gpu_mode,
            balance=balance,
        )
        if not node_token:
            raise ConfigError("a node token is required (--node-token or BRIDGE_NODE_TOKEN)")
        run(run_bridge(config))
    except (ConfigError, AuthError) as exc:
        fail(exc)


@main.command()
@relay_options
@opt(
    "--route",
    env="ROUTE",
    multiple=True,
    help="NAME=URL[,URL...] of an upstream (repeatable); several URLs are replicas, balanced by "
    "conversation affinity, else least outstanding requests. NAME=openai+URL: an engine with only "
    "OpenAI's API, in front of which the "
    f"bridge serves Ollama's REST API. Default: {' '.join(DEFAULT_ROUTES)}",
)
@log_level
def up(route: tuple[str, ...], log_level: str, **kw: Any) -> None:
    """Relay + bridge in one process, in front of the given upstreams; prints the URL and a key."""
    setup_logging(log_level)
    from .node.bridge import Bridge
    from .relay.server import serve

    try:
        routes = parse_routes(route or DEFAULT_ROUTES)
        config = relay_config(kw)
        store = Store(config.data_dir)
        for record in store.list_keys():
            if record.label == "bridge up" and record.revoked is None:
                store.revoke_key(record.id)
        key, key_id = new_key()
        store.add_key(key_id, hash_key(key), "bridge up")
        token = config.node_token or store.secret("node_token")
        store.close()
    except ConfigError as exc:
        fail(exc)

    async def serve_both() -> None:
        bridge: Bridge | None = None

        def ready(_relay: Any, ports: list[int]) -> None:
            nonlocal bridge
            url = f"http://{display_host(config.host)}:{ports[0]}"
            bridge = Bridge(BridgeConfig(relay=url, routes=routes, node_token=token, node_name="local"))
            task = asyncio.get_running_loop().create_task(bridge.run())
            task.add_done_callback(_report_bridge_end)
            click.echo(
                f"\n  relay:  {url}/   (Open WebUI at / when the route '{config.default_route}' exists)"
            )
            upstreams: dict[str, list[str]] = {}
            for r in routes:
                upstreams.setdefault(r.name, []).append(r.url)
            for name, urls in upstreams.items():
                api = next(r.api for r in routes if r.name == name)
                front = "  (OpenAI API; Ollama's API served by the bridge)" if api == "openai" else ""
                click.echo(f"  route:  {url}/r/{name}/  ->  {', '.join(urls)}{front}")
            click.echo(f"  key:    {key}")
            click.echo(f"  try:    curl -H 'Authorization: Bearer {key}' {url}/r/{routes[0].name}/\n")

        await serve(config, ready=ready)
        if bridge is not None:
            bridge.stop()

    run(serve_both())


def _report_bridge_end(task: asyncio.Task[None]) -> None:
    """``bridge up``'s in-process bridge ended: say why when it crashed (never silently)."""
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logging.getLogger("bridge.up").error(
            "the in-process bridge stopped: %s; the relay keeps serving without it", exc, exc_info=exc
        )


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
    ended = store.end_sessions(key_id=key_id) if ok else 0
    store.close()
    if not ok:
        fail(ConfigError(f"no active key with id {key_id}"))
    click.echo(f"revoked {key_id} (and its {ended} browser session(s))")


@main.group()
def sessions() -> None:
    """Browser login sessions (kept in the relay's data directory; a running relay notices a
    revocation within a few seconds)."""


@sessions.command("list")
@data_dir
def sessions_list(data_dir: Path) -> None:
    """List live sessions: the start of their id, their key, when they started and expire."""
    store = Store(data_dir)
    for record in store.list_sessions():
        click.echo(
            f"{record.id[:8]}  key {record.key_id}  {_when(record.created)}  expires {_when(record.expires)}"
        )
    store.close()


@sessions.command("revoke")
@data_dir
@click.option("--all", "everyone", is_flag=True, help="End every session (log everyone out).")
@click.option("--key", "key_id", default=None, help="End the sessions of the key with this id.")
def sessions_revoke(data_dir: Path, everyone: bool, key_id: str | None) -> None:
    """End browser sessions: every one (--all) or a key's (--key ID)."""
    if everyone == (key_id is not None):
        fail(ConfigError("give either --all or --key ID"))
    store = Store(data_dir)
    ended = store.end_sessions(key_id=key_id)
    store.close()
    click.echo(f"ended {ended} session(s)")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


if __name__ == "__main__":  # pragma: no cover
    main(prog_name=os.path.basename(sys.argv[0]))
