"""``bridge deploy cloudflare``: the Cloudflare relay on the user's account with one API token.

What a deployment does, in order (each step idempotent, so a second run updates in place):

1. finds the account (``account_id``, or the only one the token sees);
2. looks the Worker up: does it exist, which Durable Object migration it last applied (its tag), which
   secrets it has (names only: Cloudflare never returns a secret's value);
3. uploads the shipped bundle (:mod:`bridge.deploy._bundle`) in one multipart request with its whole
   configuration: the Durable Object binding, the ``[vars]`` (defaults overridden by ``vars``), the
   secrets this run sets, ``keep_bindings: ["secret_text"]`` so the secrets it does not set survive
   (what ``wrangler deploy`` does), and only the migrations after the Worker's tag
   (``new_sqlite_classes`` once, on the first deployment; none when it is up to date);
4. makes sure the account has a workers.dev subdomain and enables the Worker's route on it.

Secrets: ``NODE_TOKEN`` (what bridges present) is set on every run: ``node_token`` when given, else
:func:`derive_node_token` of the API token, so every notebook holding the same API token finds the same
node token without storing anything, and several notebooks can serve one relay.
``CLIENT_KEY_HASHES`` (SHA-256 of the client keys) is set on the first deployment (a new key, returned
once in :attr:`Deployed.client_key`), with ``new_key`` (a new key replaces the old ones: Cloudflare cannot
read the hashes back to add one) or ``api_keys`` (those keys); otherwise the relay keeps its keys.
``COOKIE_SECRET`` is made once. Nothing here prints or logs a token or a key.
"""

from __future__ import annotations

import base64
import hmac
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, DeployError
from ..relay import auth
from . import API_BASE, DEFAULT_NAME
from ._bundle import Bundle, load_bundle
from ._cfapi import CloudflareAPI

#: The relay's secrets (deployment/cloudflare/src/http.ts ``Env``).
NODE_TOKEN, CLIENT_KEY_HASHES, COOKIE_SECRET = "NODE_TOKEN", "CLIENT_KEY_HASHES", "COOKIE_SECRET"
#: A Worker name that is also a valid DNS label of its workers.dev host.
_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Deployed:
    """A deployed relay: what a bridge and a client need."""

    url: str
    """``https://<name>.<subdomain>.workers.dev``: clients use it, bridges dial it (``wss://``)."""
    node_token: str
    """What a bridge presents (``bridge connect --node-token``). Secret."""
    client_key: str | None
    """A client key made by this run (shown once), or None when the relay kept its keys."""
    account_id: str
    name: str
    created: bool
    """Whether this run created the Worker."""
    migration: str | None
    """The Durable Object migration tag applied by this run, if any."""

    @property
    def ws_url(self) -> str:
        return "wss://" + self.url.removeprefix("https://")


def derive_node_token(api_token: str, account_id: str, name: str) -> str:
    """The node token of Worker ``name`` when none is given: HMAC-SHA256 keyed by the API token, so it
    is stable for one API token and reveals nothing about it (whoever has the API token controls the
    Worker anyway). Rolling the API token changes it at the next deployment."""
    mac = hmac.new(
        api_token.encode(), f"kaggle-bridge node token v1\n{account_id}\n{name}".encode(), "sha256"
    )
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ConfigError(
            f"--name {name!r}: a Worker name here is 1-63 lowercase letters, digits and inner hyphens "
            "(it is also the first label of its workers.dev host)"
        )
    return name


def _migrations(bundle: Bundle, current: str | None, name: str) -> dict[str, Any] | None:
    """The ``migrations`` to upload, as wrangler computes them: all, with ``new_tag`` only, for a Worker
    that has none; the steps after ``current`` with ``old_tag`` (Cloudflare rejects the upload if the
    Worker's tag moved meanwhile); nothing when it is up to date."""
    tags = [m["tag"] for m in bundle.migrations]
    if not tags:
        return None
    if current is None:
        done = 0
    elif current in tags:
        done = tags.index(current) + 1
    else:
        raise DeployError(
            f"the Worker {name!r} has the Durable Object migration tag {current!r}, which this relay does "
            f"not know ({', '.join(tags)}): it is another Worker, or made by a newer kaggle-bridge; choose "
            "another --name or upgrade"
        )
    steps = [{k: v for k, v in m.items() if k != "tag"} for m in bundle.migrations[done:]]
    if not steps:
        return None
    return {**({"old_tag": current} if current else {}), "new_tag": tags[-1], "steps": steps}


def _vars(bundle: Bundle, overrides: Mapping[str, str]) -> dict[str, str]:
    unknown = sorted(set(overrides) - set(bundle.vars))
    if unknown:
        raise ConfigError(
            f"unknown --var {', '.join(unknown)}; the relay's settings: {', '.join(bundle.vars)}"
        )
    return {**bundle.vars, **overrides}


def _account(api: CloudflareAPI, account_id: str) -> str:
    if account_id:
        return account_id
    accounts = api.accounts()
    if len(accounts) == 1:
        return accounts[0].id
    if not accounts:
        raise ConfigError("the API token sees no account: give it access to one, or pass --account-id")
    names = ", ".join(f"{a.id} ({a.name})" for a in accounts)
    raise ConfigError(f"the API token sees {len(accounts)} accounts: choose one with --account-id ({names})")


def deploy(
    api_token: str,
    *,
    account_id: str = "",
    name: str = DEFAULT_NAME,
    node_token: str = "",
    new_key: bool = False,
    api_keys: Iterable[str] = (),
    vars: Mapping[str, str] | None = None,
    subdomain: str = "",
    api_base: str = API_BASE,
    bundle: Bundle | None = None,
    progress: Callable[[str], None] = lambda _line: None,
) -> Deployed:
    """Deploy or update the Cloudflare relay; see the module's docstring. ``progress`` receives one
    line per step (never a secret). Raises :class:`DeployError` (Cloudflare said no: the message names
    the permission a token lacks) or :class:`ConfigError`."""
    check_name(name)
    bundle = bundle or load_bundle()
    settings = _vars(bundle, vars or {})
    keys = [k.strip() for k in api_keys if k.strip()]
    with CloudflareAPI(api_token, base_url=api_base) as api:
        account = _account(api, account_id)
        exists, tag = api.migration_tag(account, name)
        have = api.secret_names(account, name) if exists else set()
        progress(f"Worker {name}: {'updating' if exists else 'creating'} (account {account})")

        token = node_token or derive_node_token(api_token, account, name)
        set_secrets = {NODE_TOKEN: token}
        client_key: str | None = None
        if new_key or keys or CLIENT_KEY_HASHES not in have:
            if new_key or not keys:
                client_key = auth.new_key()[0]
                keys.append(client_key)
            set_secrets[CLIENT_KEY_HASHES] = ",".join(auth.hash_key(k) for k in keys)
            progress(f"client keys: {len(keys)} set ({'a new key' if client_key else 'the keys given'})")
        else:
            progress("client keys: kept (--new-key makes a new one)")
        if COOKIE_SECRET not in have:
            set_secrets[COOKIE_SECRET] = secrets.token_urlsafe(32)

        migrations = _migrations(bundle, tag, name)
        bindings: list[dict[str, Any]] = [
            {"type": "durable_object_namespace", "name": binding, "class_name": cls}
            for binding, cls in bundle.durable_objects
        ]
        bindings += [{"type": "plain_text", "name": k, "text": v} for k, v in settings.items()]
        bindings += [{"type": "secret_text", "name": k, "text": v} for k, v in set_secrets.items()]
        metadata: dict[str, Any] = {
            "main_module": bundle.main_module,
            "compatibility_date": bundle.compatibility_date,
            "bindings": bindings,
            "keep_bindings": ["secret_text"],
        }
        if bundle.compatibility_flags:
            metadata["compatibility_flags"] = list(bundle.compatibility_flags)
        if migrations:
            metadata["migrations"] = migrations
        api.upload(account, name, metadata, bundle.main_module, bundle.code)
        progress(
            "uploaded the Worker"
            + (f", Durable Object migration {migrations['new_tag']}" if migrations else ", no migration due")
        )

        sub = api.account_subdomain(account)
        if sub is None:
            sub = api.create_account_subdomain(account, subdomain or f"kb-{account[:8]}")
            progress(f"registered the workers.dev subdomain {sub} (its DNS may take a few minutes)")
        api.enable_workers_dev(account, name)
    return Deployed(
        url=f"https://{name}.{sub}.workers.dev",
        node_token=token,
        client_key=client_key,
        account_id=account,
        name=name,
        created=not exists,
        migration=migrations["new_tag"] if migrations else None,
    )


def delete(
    api_token: str, *, account_id: str = "", name: str = DEFAULT_NAME, api_base: str = API_BASE
) -> bool:
    """Delete the relay's Worker, its Durable Object and the object's storage. False when there was
    none."""
    check_name(name)
    with CloudflareAPI(api_token, base_url=api_base) as api:
        return api.delete_script(_account(api, account_id), name)
