"""The few calls of Cloudflare's REST API (v4) that deploy the relay, over ``httpx``.

Why not the official ``cloudflare`` SDK (checked: cloudflare-python 5.9.0): it has most of these calls
(``workers.scripts.update``, ``.secrets.list``, ``.subdomain.create``, ``workers.subdomains``,
``accounts.list``) but not the one that decides the Durable Object migrations, the Worker's current
``migration_tag``: wrangler reads it from ``GET /accounts/{id}/workers/services/{name}``
(``getMigrationsToUpload`` in wrangler 4.155's ``wrangler-dist/cli.js``), which the SDK does not wrap.
The SDK weighs 39 MB in 6,379 files, adds ``distro`` and about 0.6 s of import time here, for seven
plain JSON/multipart requests; ``httpx`` is already a dependency. The shapes below follow the SDK's
source (``src/cloudflare/resources/workers/...``), wrangler's (``createWorkerUploadForm``) and the API
reference (developers.cloudflare.com/api/), which names the permissions each call accepts.

Cloudflare does not say which permission a token lacks: a missing one gets HTTP 403 with error code
10000 "Authentication error" (wrangler PR #4597 says so too), so each call here names the permission
it needs and the error message repeats it. Nothing here logs; errors never contain the token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from .. import __version__
from ..errors import DeployError
from . import API_BASE

# Permission names as the dashboard's token editor shows them ("Edit" is the API reference's "Write").
#: Upload, secrets, workers.dev route, delete (API reference: "Workers Scripts Write").
SCRIPTS_EDIT = "Account > Workers Scripts > Edit"
#: Look a Worker up (its migration tag, its secrets' names), the account's workers.dev subdomain: the
#: reference accepts "Workers Scripts Read" or "Workers Scripts Write".
SCRIPTS_READ = "Account > Workers Scripts > Read (or Edit)"
#: List the accounts the token sees, to find the account id; not needed with --account-id. Part of
#: Cloudflare's "Edit Cloudflare Workers" token template (developers.cloudflare.com/fundamentals/api/
#: reference/template/).
ACCOUNT_READ = "Account > Account Settings > Read"

#: Error codes meaning "no such Worker" (wrangler's isWorkerNotFoundError and suppressNotFoundError).
NOT_FOUND = {10007, 10090, 10092}
#: The token itself is rejected: 9109 "Invalid access token", 6003/6111 a malformed header, 1000
#: "Invalid API Token", 9106 missing credentials (wrangler's AUTHENTICATION_ERROR_CODES + issues).
BAD_TOKEN = {1000, 6003, 6111, 9106, 9109}
#: The token is valid but lacks a permission for this call.
FORBIDDEN = 10000
#: The account has no workers.dev subdomain yet (GET /workers/subdomain; wrangler treats it so).
NO_SUBDOMAIN = 10007
#: A workers.dev subdomain that is already taken (wrangler's registration prompt).
SUBDOMAIN_TAKEN = 10031
RETRIES = 3


@dataclass(frozen=True)
class Account:
    id: str
    name: str


class CloudflareAPI:
    """A client for one API token. ``base_url`` points elsewhere only in tests (a stand-in)."""

    def __init__(self, token: str, *, base_url: str = API_BASE, timeout: float = 60.0) -> None:
        if not token:
            raise DeployError("a Cloudflare API token is required (CLOUDFLARE_API_TOKEN)")
        self._client = httpx.Client(
            base_url=base_url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": f"kaggle-bridge/{__version__}"},
            timeout=timeout,
            transport=httpx.HTTPTransport(retries=2),  # connection failures only
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> CloudflareAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------- calls

    def accounts(self) -> list[Account]:
        """The accounts the token sees (``GET /accounts``)."""
        found: list[Account] = []
        page = 1
        while True:
            body = self._call("GET", "/accounts", "list your accounts", ACCOUNT_READ, params={"page": page})
            found += [Account(a["id"], a.get("name", "")) for a in body["result"] or []]
            info = body.get("result_info") or {}
            if page >= int(info.get("total_pages") or 1):
                return found
            page += 1

    def migration_tag(self, account: str, script: str) -> tuple[bool, str | None]:
        """Whether the Worker exists, and the tag of its last Durable Object migration. The same
        call as wrangler's ``getMigrationsToUpload`` (the SDK has none)."""
        body = self._call(
            "GET",
            f"/accounts/{account}/workers/services/{script}",
            "look the Worker up",
            SCRIPTS_READ,
            missing_ok=True,
        )
        if body is None:
            return False, None
        script_info = (body["result"] or {}).get("default_environment", {}).get("script", {})
        return True, script_info.get("migration_tag") or None

    def secret_names(self, account: str, script: str) -> set[str]:
        """The names of the Worker's secrets (values cannot be read back). SDK:
        ``workers.scripts.secrets.list``."""
        body = self._call(
            "GET",
            f"/accounts/{account}/workers/scripts/{script}/secrets",
            "list the Worker's secrets",
            SCRIPTS_READ,
            missing_ok=True,
        )
        return set() if body is None else {s["name"] for s in body["result"] or []}

    def upload(self, account: str, script: str, metadata: dict[str, Any], module: str, code: bytes) -> None:
        """Upload and deploy the Worker: multipart, a ``metadata`` JSON part and the module part typed
        ``application/javascript+module`` (SDK: ``workers.scripts.update``; wrangler's
        ``createWorkerUploadForm``)."""
        files = {
            "metadata": (None, json.dumps(metadata), "application/json"),
            module: (module, code, "application/javascript+module"),
        }
        self._call(
            "PUT",
            f"/accounts/{account}/workers/scripts/{script}",
            "upload the Worker",
            SCRIPTS_EDIT,
            files=files,
        )

    def account_subdomain(self, account: str) -> str | None:
        """The account's ``<subdomain>.workers.dev``, or None when it has none yet. SDK:
        ``workers.subdomains.get``."""
        try:
            body = self._call(
                "GET",
                f"/accounts/{account}/workers/subdomain",
                "read your workers.dev subdomain",
                SCRIPTS_READ,
            )
        except DeployError as exc:
            if exc.code == NO_SUBDOMAIN:
                return None
            raise
        return str(body["result"]["subdomain"])

    def create_account_subdomain(self, account: str, name: str) -> str:
        """Register ``<name>.workers.dev`` for the account (``PUT /workers/subdomain``, as wrangler does
        on a first deploy; SDK: ``workers.subdomains.update``)."""
        try:
            body = self._call(
                "PUT",
                f"/accounts/{account}/workers/subdomain",
                "register a workers.dev subdomain",
                SCRIPTS_EDIT,
                json={"subdomain": name},
            )
        except DeployError as exc:
            if exc.code == SUBDOMAIN_TAKEN:
                raise DeployError(
                    f"the workers.dev subdomain {name!r} is taken: choose another with --subdomain",
                    code=exc.code,
                ) from None
            raise
        return str(body["result"]["subdomain"])

    def enable_workers_dev(self, account: str, script: str) -> None:
        """Serve the Worker at ``<script>.<subdomain>.workers.dev`` (SDK:
        ``workers.scripts.subdomain.create``; previews off, as the relay has one version)."""
        self._call(
            "POST",
            f"/accounts/{account}/workers/scripts/{script}/subdomain",
            "enable the workers.dev route",
            SCRIPTS_EDIT,
            json={"enabled": True, "previews_enabled": False},
        )

    def delete_script(self, account: str, script: str) -> bool:
        """Delete the Worker with its Durable Object namespace and storage (``force=true``: the SDK's
        ``workers.scripts.delete``; without it Cloudflare refuses while a Durable Object is bound).
        False when there was no such Worker."""
        body = self._call(
            "DELETE",
            f"/accounts/{account}/workers/scripts/{script}",
            "delete the Worker",
            SCRIPTS_EDIT,
            params={"force": "true"},
            missing_ok=True,
        )
        return body is not None

    # ------------------------------------------------------------------------------- plumbing

    def _call(
        self,
        method: str,
        path: str,
        what: str,
        permission: str,
        *,
        missing_ok: bool = False,
        **kw: Any,
    ) -> Any:
        """One request; the decoded JSON envelope, or None for a missing Worker when ``missing_ok``.
        Retries 429 and 5xx (all these calls are idempotent), honouring ``Retry-After``."""
        for attempt in range(RETRIES + 1):
            try:
                response = self._client.request(method, path, **kw)
            except httpx.HTTPError as exc:
                raise DeployError(f"could not reach Cloudflare's API to {what}: {exc}") from None
            if (response.status_code == 429 or response.status_code >= 500) and attempt < RETRIES:
                time.sleep(min(float(response.headers.get("retry-after", 0) or 0) or 0.5 * 2**attempt, 10.0))
                continue
            break
        try:
            body = response.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if response.is_success and body.get("success", True):
            return body
        errors = [e for e in body.get("errors") or [] if isinstance(e, dict)]
        codes = [int(e.get("code") or 0) for e in errors]
        said = (
            "; ".join(f"{e.get('message', '')} [code {e.get('code')}]" for e in errors)
            or response.reason_phrase
        )
        if missing_ok and response.status_code == 404 and (NOT_FOUND & set(codes) or not codes):
            return None
        code = codes[0] if codes else None
        if response.status_code == 401 or BAD_TOKEN & set(codes):
            raise DeployError(
                f"Cloudflare refused the API token (to {what}: {said}); check CLOUDFLARE_API_TOKEN",
                status=response.status_code,
                code=code,
            )
        if response.status_code == 403:
            raise DeployError(
                f"the API token lacks the permission {permission!r} (on this account), needed to {what} "
                f"(Cloudflare answered "
                f"403: {said}); add it to the token in the dashboard (My Profile > API Tokens), or make one "
                "from the 'Edit Cloudflare Workers' template",
                status=403,
                code=code,
                permission=permission,
            )
        raise DeployError(
            f"Cloudflare's API could not {what}: HTTP {response.status_code}: {said}",
            status=response.status_code,
            code=code,
        )
