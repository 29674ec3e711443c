"""Which relay the bridge dials: the one in ``BRIDGE_RELAY``, one deployed on Cloudflare Workers, or
a local one started here.

With ``BRIDGE_RELAY`` set (env or Kaggle Secret) the bridge dials it with ``BRIDGE_NODE_TOKEN``; its
URL is a secret (never shown). Without it, and with ``CLOUDFLARE_API_TOKEN`` set (``--cloudflare
auto``), :data:`CLOUDFLARE_DEPLOY` deploys the relay on Cloudflare Workers, or finds it, with ``bridge
deploy cloudflare``'s code. Else a local relay (``bridge relay``) starts as a child, with a fresh
node token and a client key kept in ``<state>/relay-client-key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from deployment.children import child_env
from deployment.engine import free_port
from deployment.session import get_secret, mask, read_or_make
from deployment.settings import code_root
from deployment.stack import Stack
from deployment.supervisor import ChildSpec, Supervisor


# ------------------------------------------------------------------------------- the Cloudflare hook
@dataclass
class RelayTarget:
    """A relay the bridge should dial: its URL, the node token, and a client key to show."""

    url: str
    node_token: str
    key: str = ""


@dataclass
class CloudflareRequest:
    """What a Cloudflare relay deploy gets: the API token (secret), where to keep its state, and
    the deployment's redacting ``say``."""

    api_token: str
    state_dir: Path
    say: Callable[[str], None]


def deploy_cloudflare(req: CloudflareRequest) -> RelayTarget:
    """The relay on Cloudflare Workers, deployed or updated in place with ``bridge deploy cloudflare``'s
    code (:func:`bridge.deploy.cloudflare.deploy`): the account from ``CLOUDFLARE_ACCOUNT_ID`` (env or
    Kaggle Secret) or the only one the token sees, the Worker name from ``DEPLOY_CLOUDFLARE_NAME``. The
    node token is derived from the API token, so every session (and every notebook holding the same
    API token) finds the same one without storing it. A client key is made only on the first
    deployment (shown once); later sessions use ``BRIDGE_KEY`` if set."""
    from bridge.deploy import API_BASE, DEFAULT_NAME  # the bridge is installed by now
    from bridge.deploy.cloudflare import deploy

    done = deploy(
        req.api_token,
        account_id=get_secret("CLOUDFLARE_ACCOUNT_ID"),
        name=os.environ.get("DEPLOY_CLOUDFLARE_NAME") or DEFAULT_NAME,
        api_base=os.environ.get("DEPLOY_CLOUDFLARE_API") or API_BASE,
        progress=req.say,
    )
    return RelayTarget(done.ws_url, done.node_token, done.client_key or "")


#: Deploys (or finds) the relay on Cloudflare Workers when ``CLOUDFLARE_API_TOKEN`` is set and no
#: ``BRIDGE_RELAY`` is (issue 19's one-step deploy); tests may replace it (here, in this module).
CLOUDFLARE_DEPLOY: Callable[[CloudflareRequest], RelayTarget] | None = deploy_cloudflare


# ---------------------------------------------------------------------------------------- URLs
def host_of(url: str) -> str:
    """``host:port`` of a URL (masked in output when the URL is a secret)."""
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0]


def http_url(relay: str) -> str:
    """The relay's HTTP(S) URL from the WebSocket one the bridge dials (or an HTTP one as is)."""
    for a, b in (("wss://", "https://"), ("ws://", "http://")):
        if relay.startswith(a):
            return b + relay[len(a) :]
    return relay


# ---------------------------------------------------------------------------------------- the choice
async def start(st: Stack, sup: Supervisor, default_route: str) -> str:
    """The relay the bridge dials (its ``ws(s)://`` URL): the configured one, one deployed on
    Cloudflare, or a local one started under ``sup`` whose root goes to ``default_route``. Sets the
    URL and key the status line shows."""
    s = st.s
    if not s.relay and s.cloudflare != "off":
        await _cloudflare_relay(st)
    if s.relay:
        if not st.node_token:
            raise RuntimeError(
                "a relay is configured but no node token (BRIDGE_NODE_TOKEN: env or Kaggle Secret)"
            )
        st.facts.url = http_url(s.relay).rstrip("/") + "/"
        st.redact.add(s.relay, st.facts.url.rstrip("/"), host_of(s.relay))
        st.facts.url_shown = "<your relay (BRIDGE_RELAY)>/"
        st.key = ""
        st.facts.key_shown = (
            f"your BRIDGE_KEY ({mask(s.key)})"
            if s.key
            else "a client key of the relay (`bridge keys add` on the relay)"
        )
        st.say("relay: the one in BRIDGE_RELAY (its URL is not shown: a secret)")
        return s.relay
    from bridge.relay.auth import new_key, new_token

    st.node_token = st.node_token or new_token()
    st.redact.add(st.node_token)
    key_file = s.state_dir / "relay-client-key"
    st.key = read_or_make(key_file, lambda: new_key()[0])
    port = s.relay_port or free_port(s.relay_host)
    host = "127.0.0.1" if s.relay_host in ("0.0.0.0", "::", "") else s.relay_host
    url = f"http://{host}:{port}"
    argv = [
        sys.executable,
        "-m",
        "bridge.cli",
        "relay",
        "--host",
        s.relay_host,
        "--port",
        str(port),
        "--data-dir",
        str(s.state_dir / "relay"),
        "--default-route",
        default_route,
        "--drain-timeout",
        "5",
        "--log-level",
        "info",
    ]
    await sup.add(
        ChildSpec(
            "relay",
            argv,
            child_env(BRIDGE_NODE_TOKEN=st.node_token, BRIDGE_API_KEYS=st.key),
            st.logs / "relay.log",
            health_url=url + "/_relay/health",
            ready_timeout=60,
            cwd=code_root(),
        )
    )
    st.facts.url = st.facts.url_shown = url + "/"
    if st.kaggle:  # a saved notebook's output is public: the key stays in its file
        st.redact.add(st.key)
        st.facts.key_shown = f"{mask(st.key)} (in {key_file})"
    else:
        st.facts.key_shown = st.key
    st.say(
        f"relay: local, {url}/ (no BRIDGE_RELAY: "
        + ("only this notebook reaches it)" if st.kaggle else "set one to serve from elsewhere)")
    )
    return f"ws://{host}:{port}"


async def _cloudflare_relay(st: Stack) -> None:
    """The hook for a relay on Cloudflare Workers (issue 19): with ``CLOUDFLARE_API_TOKEN`` and no
    ``BRIDGE_RELAY``, :data:`CLOUDFLARE_DEPLOY` deploys it and the bridge dials it."""
    s = st.s
    token = get_secret("CLOUDFLARE_API_TOKEN")
    if not token:
        if s.cloudflare == "on":
            raise RuntimeError("--cloudflare on: no CLOUDFLARE_API_TOKEN (env or Kaggle Secret)")
        return
    st.redact.add(token)
    if CLOUDFLARE_DEPLOY is None:
        if s.cloudflare == "on":
            raise RuntimeError("--cloudflare on: this version cannot deploy the Cloudflare relay")
        st.say(
            "CLOUDFLARE_API_TOKEN is set, but this version cannot deploy the Cloudflare relay yet: "
            "a local relay instead (set BRIDGE_RELAY to a relay you run)"
        )
        return
    st.say("relay: deploying the Cloudflare relay (CLOUDFLARE_API_TOKEN)")
    target = await asyncio.to_thread(
        CLOUDFLARE_DEPLOY, CloudflareRequest(token, s.state_dir / "cloudflare", st.say)
    )
    st.redact.add(target.url, target.node_token, target.key)
    s.relay, st.node_token = target.url, target.node_token
    s.key = s.key or target.key


# ---------------------------------------------------------------------------------------- its health
async def health(st: Stack, client: httpx.AsyncClient) -> dict[str, Any]:
    """The relay's ``/_relay/health`` (how many bridges it has, whether ours is one)."""
    r = await client.get(st.facts.url + "_relay/health")
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


async def wait_node_connected(st: Stack, timeout: float = 30.0) -> None:
    """Until the relay lists this bridge; a warning (not an error) after ``timeout``."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                if (await health(st, client)).get("node_connected"):
                    return
            await asyncio.sleep(0.2)
    st.say(
        f"WARNING: the relay does not list this bridge after {timeout:.0f} s (see {st.logs / 'bridge.log'})"
    )
