"""``bridge deploy``: its commands, added to the ``bridge`` command group by ``bridge/cli.py``. Every
flag is also a ``BRIDGE_*`` environment variable (and the token and account also wrangler's own
``CLOUDFLARE_API_TOKEN`` / ``CLOUDFLARE_ACCOUNT_ID``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import ConfigError, DeployError
from . import API_BASE, DEFAULT_NAME

if TYPE_CHECKING:
    from .cloudflare import Deployed


def _env_file_text(deployed: Deployed) -> str:
    return (
        "# Written by `bridge deploy cloudflare`: the bridge's settings for this relay. SECRET: keep it\n"
        "# private. Use: set -a; . THIS_FILE; set +a; bridge connect --route NAME=URL ...\n"
        f"BRIDGE_RELAY={deployed.ws_url}\n"
        f"BRIDGE_NODE_TOKEN={deployed.node_token}\n"
    )


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    path.chmod(0o600)


@click.group()
def deploy() -> None:
    """Deploy the relay where you have no server of your own."""


def _opt(*names: str, env: str, extra_env: str = "", **kw: Any) -> Any:
    envvar = [f"BRIDGE_{env}", *([extra_env] if extra_env else [])]
    return click.option(*names, envvar=envvar, show_envvar=True, **kw)


@deploy.command()
@_opt(
    "--api-token",
    env="CLOUDFLARE_API_TOKEN",
    extra_env="CLOUDFLARE_API_TOKEN",
    default="",
    help="A Cloudflare API token with Account > Workers Scripts > Edit (and Account Settings > Read "
    "unless --account-id is given), e.g. from the 'Edit Cloudflare Workers' template. Prefer the "
    "variable: a flag shows in the process list.",
)
@_opt(
    "--account-id",
    env="CLOUDFLARE_ACCOUNT_ID",
    extra_env="CLOUDFLARE_ACCOUNT_ID",
    default="",
    help="The account to deploy to (default: the only one the token sees).",
)
@_opt(
    "--name",
    env="CLOUDFLARE_NAME",
    default=DEFAULT_NAME,
    show_default=True,
    help="The Worker's name; the relay is at https://NAME.<subdomain>.workers.dev.",
)
@_opt(
    "--node-token",
    env="NODE_TOKEN",
    default="",
    help="The node token bridges present (default: derived from the API token, the same on every run).",
)
@_opt(
    "--new-key",
    env="NEW_KEY",
    is_flag=True,
    help="Make a new client key (printed once); it replaces the relay's keys. Without it a redeployment "
    "keeps them.",
)
@_opt(
    "--api-keys",
    env="API_KEYS",
    default="",
    help="Comma-separated client keys for the relay to accept (only their hashes are uploaded); they "
    "replace its keys.",
)
@_opt(
    "--var",
    "vars_",
    env="CLOUDFLARE_VARS",
    multiple=True,
    help="NAME=VALUE: a relay setting (DEFAULT_ROUTE, USER_ROUTE, GRACE, HEARTBEAT, MAX_BODY, COALESCE, "
    "STATS_INTERVAL; see deployment/cloudflare/README.md), repeatable; unset ones get their defaults.",
)
@_opt(
    "--subdomain",
    env="CLOUDFLARE_SUBDOMAIN",
    default="",
    help="The account's workers.dev subdomain to register if it has none yet (default: kb-<account id>).",
)
@_opt(
    "--env-file",
    env="CLOUDFLARE_ENV_FILE",
    default=None,
    help="Where to write BRIDGE_RELAY and BRIDGE_NODE_TOKEN for `bridge connect` (mode 600; default: "
    ".data/cloudflare/NAME.env; empty: nowhere).",
)
@_opt(
    "--delete", env="CLOUDFLARE_DELETE", is_flag=True, help="Delete the relay (its Worker and stored state)."
)
@_opt("--yes", env="YES", is_flag=True, help="Do not ask before --delete.")
@_opt(
    "--api-url",
    env="CLOUDFLARE_API_URL",
    default=API_BASE,
    show_default=True,
    help="Cloudflare's API (another only to test against a stand-in).",
)
def cloudflare(
    api_token: str,
    account_id: str,
    name: str,
    node_token: str,
    new_key: bool,
    api_keys: str,
    vars_: tuple[str, ...],
    subdomain: str,
    env_file: str | None,
    delete: bool,
    yes: bool,
    api_url: str,
) -> None:
    """Deploy (or update, or --delete) the relay on Cloudflare Workers + Durable Objects with an API
    token: no Node, no wrangler, no browser login. Prints the relay's URL and, the first time, a
    client key; idempotent."""
    from . import cloudflare as cf  # here: httpx is not imported by every `bridge` command

    try:
        cf.check_name(name)
        env_path = (
            Path(".data/cloudflare") / f"{name}.env"
            if env_file is None
            else Path(env_file)
            if env_file
            else None
        )
        if delete:
            if not yes:
                click.confirm(
                    f"Delete the Worker {name!r}, its Durable Object and everything it stores?", abort=True
                )
            gone = cf.delete(api_token, account_id=account_id, name=name, api_base=api_url)
            if env_path is not None and env_path.is_file():
                env_path.unlink()
            click.echo(f"deleted the Worker {name}" if gone else f"there was no Worker {name}")
            return
        settings: dict[str, str] = {}
        for item in vars_:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"--var {item!r}: expected NAME=VALUE")
            settings[key] = value
        deployed = cf.deploy(
            api_token,
            account_id=account_id,
            name=name,
            node_token=node_token,
            new_key=new_key,
            api_keys=api_keys.split(","),
            vars=settings,
            subdomain=subdomain,
            api_base=api_url,
            progress=lambda line: click.echo(f"  {line}", err=True),
        )
    except (ConfigError, DeployError) as exc:
        click.echo(f"error: {exc}", err=True)
        raise SystemExit(2) from None
    click.echo(f"\n  relay:   {deployed.url}/   ({'created' if deployed.created else 'updated'})")
    if deployed.client_key:
        click.echo(f"  key:     {deployed.client_key}   (new: shown once, keep it)")
    else:
        click.echo(
            "  keys:    kept (the key printed when it was made still works; --new-key makes a new one)"
        )
    if env_path is not None:
        _write_private(env_path, _env_file_text(deployed))
        click.echo(f"  bridge:  its relay URL and node token are in {env_path} (secret, mode 600):")
        click.echo(
            f"           set -a; . {env_path}; set +a; bridge connect --route ollama=http://127.0.0.1:11434"
        )
    else:
        click.echo(
            f"  bridge:  bridge connect --relay {deployed.ws_url} (node token: --node-token or derived)"
        )
    click.echo(f"  health:  curl {deployed.url}/_relay/health\n")
