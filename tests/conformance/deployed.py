"""The Cloudflare relay exactly as ``bridge deploy cloudflare`` uploads it, under workerd.

:class:`DeployedWorkerdRelay` deploys with :func:`bridge.deploy.cloudflare.deploy` to the stand-in of
Cloudflare's API (``tests/cloudflare_api.py``), then runs what the stand-in received: the module's
bytes as uploaded, and a ``wrangler.toml`` written from the upload's metadata (its compatibility date,
Durable Object binding, migrations and plain-text vars) with the secrets it set (node token, client key
hashes, cookie secret) in the env file. ``wrangler dev --local`` runs the module unbundled
(``no_bundle``), so the conformance tests exercise the shipped bundle, its configuration and the secrets
the deploy code made, not the TypeScript sources.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bridge.deploy.cloudflare import deploy

from ..cloudflare_api import ACCOUNT, NAME, CloudflareStandIn
from ..procs import API_KEY, NODE_TOKEN
from .workerd import WorkerdRelay, require_setup

TOKEN = "cf-conformance-token"


def _toml(value: Any) -> str:
    return json.dumps(value)  # a JSON string or list of strings is a valid TOML value


def wrangler_toml(worker: dict[str, Any]) -> str:
    """A wrangler configuration equivalent to what the Worker was uploaded with."""
    meta = worker["metadata"]
    lines = [
        f"name = {_toml(NAME)}",
        f"main = {_toml(meta['main_module'])}",
        f"compatibility_date = {_toml(meta['compatibility_date'])}",
        f"compatibility_flags = {_toml(meta.get('compatibility_flags', []))}",
        "no_bundle = true",
    ]
    for b in worker["bindings"]:
        if b["type"] == "durable_object_namespace":
            lines += [
                "[[durable_objects.bindings]]",
                f"name = {_toml(b['name'])}",
                f"class_name = {_toml(b['class_name'])}",
            ]
    for step in worker["migrations"]:
        lines += ["[[migrations]]", *(f"{k} = {_toml(v)}" for k, v in step.items())]
    lines.append("[vars]")
    lines += [f"{b['name']} = {_toml(b['text'])}" for b in worker["bindings"] if b["type"] == "plain_text"]
    return "\n".join(lines) + "\n"


class DeployedWorkerdRelay(WorkerdRelay):
    kind = "cloudflare-deployed"

    def __init__(
        self, data_dir: Path, *, default_route: str = "webui", grace: float = 30, heartbeat: float = 5
    ) -> None:
        require_setup()
        api = CloudflareStandIn(
            "--token", f"{TOKEN}=edit,read,account", "--account", f"{ACCOUNT}=Conformance"
        )
        try:
            self.deployed = deploy(
                TOKEN,
                api_base=api.base,
                node_token=NODE_TOKEN,
                api_keys=[API_KEY],
                vars={"DEFAULT_ROUTE": default_route, "GRACE": str(grace), "HEARTBEAT": str(heartbeat)},
            )
            worker = api.worker()
            module = api.module()
        finally:
            api.proc.stop()
        folder = data_dir / "uploaded"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / worker["metadata"]["main_module"]).write_bytes(module)
        (folder / "wrangler.toml").write_text(wrangler_toml(worker))
        super().__init__(
            data_dir,
            config=folder / "wrangler.toml",
            secrets={b["name"]: b["text"] for b in worker["bindings"] if b["type"] == "secret_text"},
        )
