"""STAND-IN for Cloudflare's REST API (v4): the calls ``bridge deploy cloudflare`` makes, on loopback.

Cloudflare's API cannot be reached here. This small aiohttp server keeps accounts, Workers, their
bindings and Durable Object migration tags in memory and checks every request's shape as Cloudflare
documents it, answering errors in Cloudflare's envelope (``{"success": false, "errors": [{"code",
"message"}], "messages": [], "result": null}``). Where each rule was checked:

- Auth: ``Authorization: Bearer <token>`` (API reference, "Security: API Token"); a malformed header
  gets 400 code 6003 + 6111, an unknown token 403 code 9109 "Invalid access token", a token without
  the permission a call needs 403 code 10000 "Authentication error" (wrangler issues #2678, #4551,
  #15616; wrangler PR #4597: Cloudflare does not name the missing permission).
- Permissions per call, from the API reference's "Accepted Permissions": upload, subdomain create,
  the Worker's workers.dev route and delete accept "Workers Scripts Write"; reading a Worker, its
  secrets and the account subdomain accept "Workers Scripts Read" or "Write". Listing accounts is
  modelled as "Account Settings Read" (the "Edit Cloudflare Workers" token template grants it).
- Upload (``PUT /accounts/{id}/workers/scripts/{name}``): multipart/form-data with a ``metadata``
  part (JSON) whose ``main_module`` names a file part typed ``application/javascript+module``
  (developers.cloudflare.com/workers/configuration/multipart-upload-metadata/; the SDK's
  ``scripts.update``; wrangler's ``createWorkerUploadForm``); ``compatibility_date`` YYYY-MM-DD;
  ``bindings`` of types ``durable_object_namespace`` (``class_name``), ``plain_text`` and
  ``secret_text`` (``text``); ``keep_bindings``, binding types kept from the previous version (what
  ``wrangler deploy`` sends to keep secrets); ``migrations`` ``{old_tag?, new_tag, steps}`` where
  ``old_tag`` must match the Worker's tag (SDK ``MetadataMigrationsWorkersMultipleStepMigrations``:
  "If they don't match, the upload is rejected") and a class is created once (a second
  ``new_sqlite_classes`` for it is refused). Error codes the docs do not give are this stand-in's own.
- ``GET /workers/services/{name}`` (migration tag: wrangler's ``getMigrationsToUpload``), 404 code
  10090 when absent; script calls 404 code 10007 (wrangler's ``isWorkerNotFoundError``).
- ``GET/PUT /accounts/{id}/workers/subdomain`` (10007 when none is registered, 10031 when taken: wrangler's
  subdomain registration), ``POST /workers/scripts/{name}/subdomain`` ``{enabled, previews_enabled}``
  (SDK ``scripts.subdomain.create``; wrangler's triggers), ``DELETE ...?force=true`` (SDK
  ``scripts.delete``).

Run ``python -m tests.cloudflare_api --port 0 --token TOKEN=edit,read,account --account ID=NAME``; it
prints ``READY <port>``. ``GET /_standin/state`` shows everything (secret values included: test only),
``GET /_standin/module/{account}/{name}`` the last uploaded module's bytes (base64), ``POST
/_standin/fail?n=N`` answers the next N API requests with 503.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import re
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from aiohttp import BodyPartReader, web

from .procs import Proc

EDIT, READ, ACCOUNT_PERM = "edit", "read", "account"
#: The account and Worker the tests use.
ACCOUNT = "0123456789abcdef0123456789abcdef"
NAME = "kaggle-bridge-relay"
MODULE_TYPE = "application/javascript+module"
BINDING_TYPES = {"durable_object_namespace", "plain_text", "secret_text"}


class CFError(Exception):
    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass
class Worker:
    module_name: str = ""
    module: bytes = b""
    metadata: dict[str, Any] = field(default_factory=dict)
    bindings: list[dict[str, Any]] = field(default_factory=list)
    classes: set[str] = field(default_factory=set)
    migration_tag: str | None = None
    migrations: list[dict[str, Any]] = field(default_factory=list)  # every step applied, with its tag
    uploads: int = 0
    workers_dev: bool = False


@dataclass
class State:
    tokens: dict[str, set[str]]
    accounts: dict[str, str]
    subdomains: dict[str, str]
    taken: set[str]
    workers: dict[tuple[str, str], Worker] = field(default_factory=dict)
    calls: list[dict[str, Any]] = field(default_factory=list)
    #: Answer this many of the next API requests with 503 (``POST /_standin/fail?n=N``).
    fail_next: int = 0


def envelope(result: Any, status: int = 200, **extra: Any) -> web.Response:
    return web.json_response(
        {"success": True, "errors": [], "messages": [], "result": result, **extra}, status=status
    )


def error(exc: CFError) -> web.Response:
    body = {
        "success": False,
        "errors": [{"code": exc.code, "message": exc.message}],
        "messages": [],
        "result": None,
    }
    return web.json_response(body, status=exc.status)


def app(state: State) -> web.Application:
    routes = web.RouteTableDef()
    base = "/client/v4"

    def authorize(request: web.Request, *accepted: str) -> None:
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer ") or not header[7:]:
            raise CFError(
                400, 6003, "Invalid request headers (6111: Invalid format for Authorization header)"
            )
        perms = state.tokens.get(header[7:])
        if perms is None:
            raise CFError(403, 9109, "Invalid access token")
        account = request.match_info.get("account")
        if account is not None and account not in state.accounts:
            raise CFError(403, 10000, "Authentication error")
        if not perms & set(accepted):
            raise CFError(403, 10000, "Authentication error")

    def worker(request: web.Request, code: int = 10007) -> Worker:
        found = state.workers.get((request.match_info["account"], request.match_info["script"]))
        if found is None:
            raise CFError(404, code, "workers.api.error.script_not_found")
        return found

    def handler(
        fn: Callable[[web.Request], Awaitable[web.Response]],
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def wrapped(request: web.Request) -> web.Response:
            try:
                if state.fail_next > 0:
                    state.fail_next -= 1
                    raise CFError(503, 10013, "stand-in: temporarily unavailable")
                response = await fn(request)
            except CFError as exc:
                response = error(exc)
            state.calls.append({"method": request.method, "path": request.path, "status": response.status})
            return response

        return wrapped

    @routes.get(base + "/accounts")
    @handler
    async def accounts(request: web.Request) -> web.Response:
        authorize(request, ACCOUNT_PERM)
        result = [{"id": i, "name": n, "type": "standard"} for i, n in state.accounts.items()]
        info = {"page": 1, "per_page": 20, "count": len(result), "total_count": len(result), "total_pages": 1}
        return envelope(result, result_info=info)

    @routes.get(base + "/accounts/{account}/workers/services/{script}")
    @handler
    async def service(request: web.Request) -> web.Response:
        authorize(request, READ, EDIT)
        w = worker(request, code=10090)
        script = {"id": request.match_info["script"], "migration_tag": w.migration_tag}
        return envelope(
            {
                "id": request.match_info["script"],
                "default_environment": {"environment": "production", "script": script},
            }
        )

    @routes.get(base + "/accounts/{account}/workers/scripts/{script}/secrets")
    @handler
    async def secrets(request: web.Request) -> web.Response:
        authorize(request, READ, EDIT)
        w = worker(request)
        return envelope(
            [{"name": b["name"], "type": "secret_text"} for b in w.bindings if b["type"] == "secret_text"]
        )

    @routes.put(base + "/accounts/{account}/workers/scripts/{script}")
    @handler
    async def upload(request: web.Request) -> web.Response:
        authorize(request, EDIT)
        key = (request.match_info["account"], request.match_info["script"])
        if not request.content_type == "multipart/form-data":
            raise CFError(400, 10001, f"expected multipart/form-data, got {request.content_type}")
        parts: dict[str, tuple[bytes, str, str | None]] = {}
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise CFError(400, 10021, "nested multipart")
            parts[part.name or ""] = (await part.read(), part.headers.get("Content-Type", ""), part.filename)
        if "metadata" not in parts:
            raise CFError(400, 10021, "missing the metadata part")
        try:
            meta = json.loads(parts["metadata"][0])
        except ValueError:
            raise CFError(400, 10021, "metadata is not JSON") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("main_module"), str):
            raise CFError(400, 10021, "metadata.main_module is required (a module Worker)")
        main = meta["main_module"]
        if main not in parts:
            raise CFError(400, 10021, f"main_module {main!r} names no part")
        content, content_type, filename = parts[main]
        if content_type != MODULE_TYPE or not filename:
            raise CFError(
                400, 10021, f"the module part must be a file typed {MODULE_TYPE}, got {content_type!r}"
            )
        if not re.fullmatch(r"\d{4}-\d\d-\d\d", str(meta.get("compatibility_date", ""))):
            raise CFError(400, 10021, "compatibility_date must be YYYY-MM-DD")
        bindings = meta.get("bindings", [])
        names: set[str] = set()
        for b in bindings:
            if (
                not isinstance(b, dict)
                or b.get("type") not in BINDING_TYPES
                or not isinstance(b.get("name"), str)
            ):
                raise CFError(400, 10021, f"invalid binding {b!r}")
            if b["name"] in names:
                raise CFError(400, 10021, f"binding name {b['name']!r} used twice")
            names.add(b["name"])
            need = "class_name" if b["type"] == "durable_object_namespace" else "text"
            if not isinstance(b.get(need), str):
                raise CFError(400, 10021, f"binding {b['name']!r} of type {b['type']} needs {need}")
        keep = meta.get("keep_bindings", [])
        if not isinstance(keep, list) or not all(isinstance(t, str) for t in keep):
            raise CFError(400, 10021, "keep_bindings must be a list of binding types")

        old = state.workers.get(key)
        classes = set(old.classes) if old else set()
        tag = old.migration_tag if old else None
        applied: list[dict[str, Any]] = []
        migrations = meta.get("migrations")
        if migrations is not None:
            if migrations.get("old_tag") != tag:
                raise CFError(
                    400,
                    10079,
                    f"migration tag precondition failed; current tag {tag}, "
                    f"expected {migrations.get('old_tag')}",
                )
            for step in migrations.get("steps", []):
                if step.get("new_classes"):
                    raise CFError(
                        400,
                        10097,
                        "In order to use Durable Objects with a free plan, you must create a namespace "
                        "using a `new_sqlite_classes` migration.",
                    )
                for cls in step.get("new_sqlite_classes", []):
                    if cls in classes:
                        raise CFError(
                            400,
                            10074,
                            f"Cannot apply new-sqlite-class migration to class '{cls}' that already exists",
                        )
                    classes.add(cls)
                applied.append({**step, "tag": migrations.get("new_tag")})
            tag = migrations.get("new_tag")
        text = content.decode(errors="replace")
        for b in bindings:
            if b["type"] == "durable_object_namespace":
                if b["class_name"] not in classes:
                    raise CFError(
                        400,
                        10061,
                        f"Durable Object class {b['class_name']} has no namespace: a migration must "
                        "create it",
                    )
                if not re.search(r"export\s*\{[^}]*\b" + re.escape(b["class_name"]) + r"\b", text):
                    raise CFError(400, 10021, f"the module does not export {b['class_name']}")
        kept = [b for b in (old.bindings if old else []) if b["type"] in keep and b["name"] not in names]
        w = old or Worker()
        w.module_name, w.module, w.metadata = main, content, meta
        w.bindings = [*bindings, *kept]
        w.classes, w.migration_tag = classes, tag
        w.migrations += applied
        w.uploads += 1
        state.workers[key] = w
        return envelope({"id": key[1], "etag": hashlib.sha256(content).hexdigest(), "migration_tag": tag})

    @routes.get(base + "/accounts/{account}/workers/subdomain")
    @handler
    async def get_subdomain(request: web.Request) -> web.Response:
        authorize(request, READ, EDIT)
        sub = state.subdomains.get(request.match_info["account"])
        if sub is None:
            raise CFError(404, 10007, "This account does not have a workers.dev subdomain")
        return envelope({"subdomain": sub})

    @routes.put(base + "/accounts/{account}/workers/subdomain")
    @handler
    async def put_subdomain(request: web.Request) -> web.Response:
        authorize(request, EDIT)
        name = (await request.json()).get("subdomain", "")
        if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", name):
            raise CFError(400, 10032, "invalid subdomain")
        if name in state.taken or name in state.subdomains.values():
            raise CFError(409, 10031, "Subdomain is unavailable")
        state.subdomains[request.match_info["account"]] = name
        return envelope({"subdomain": name})

    @routes.post(base + "/accounts/{account}/workers/scripts/{script}/subdomain")
    @handler
    async def script_subdomain(request: web.Request) -> web.Response:
        authorize(request, EDIT)
        w = worker(request)
        body = await request.json()
        if not isinstance(body.get("enabled"), bool):
            raise CFError(400, 10021, "enabled (boolean) is required")
        w.workers_dev = body["enabled"]
        return envelope({"enabled": w.workers_dev, "previews_enabled": bool(body.get("previews_enabled"))})

    @routes.delete(base + "/accounts/{account}/workers/scripts/{script}")
    @handler
    async def delete(request: web.Request) -> web.Response:
        authorize(request, EDIT)
        w = worker(request)
        if w.classes and request.query.get("force") != "true":
            raise CFError(400, 10064, "the Worker has Durable Object namespaces: delete with force=true")
        del state.workers[(request.match_info["account"], request.match_info["script"])]
        return envelope(None)

    @routes.get("/_standin/state")
    async def dump(request: web.Request) -> web.Response:
        workers = {
            f"{a}/{s}": {
                "module_name": w.module_name,
                "module_sha256": hashlib.sha256(w.module).hexdigest(),
                "module_content_type": MODULE_TYPE,
                "metadata": w.metadata,
                "bindings": w.bindings,
                "classes": sorted(w.classes),
                "migration_tag": w.migration_tag,
                "migrations": w.migrations,
                "uploads": w.uploads,
                "workers_dev": w.workers_dev,
            }
            for (a, s), w in state.workers.items()
        }
        return web.json_response({"workers": workers, "subdomains": state.subdomains, "calls": state.calls})

    @routes.post("/_standin/fail")
    async def fail(request: web.Request) -> web.Response:
        state.fail_next = int(request.query["n"])
        return web.json_response({"fail_next": state.fail_next})

    @routes.get("/_standin/module/{account}/{script}")
    async def module(request: web.Request) -> web.Response:
        w = state.workers[(request.match_info["account"], request.match_info["script"])]
        return web.Response(body=base64.b64encode(w.module), content_type="text/plain")

    application = web.Application()
    application.add_routes(routes)
    return application


class CloudflareStandIn:
    """For tests: the stand-in in its own process; ``base`` for the deploy code, ``state()`` to check."""

    def __init__(self, *args: str) -> None:
        self.proc = Proc(
            [sys.executable, "-m", "tests.cloudflare_api", "--port", "0", *args], "cloudflare-api"
        )
        port = self.proc.wait_for(r"^READY (\d+)").group(1)
        self.url = f"http://127.0.0.1:{port}"
        self.base = self.url + "/client/v4"

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(self.url + "/_standin/state", timeout=10).json()
        return data

    def worker(self, name: str = NAME, account: str = ACCOUNT) -> dict[str, Any]:
        worker: dict[str, Any] = self.state()["workers"][f"{account}/{name}"]
        return worker

    def secrets(self, name: str = NAME) -> dict[str, str]:
        return {b["name"]: b["text"] for b in self.worker(name)["bindings"] if b["type"] == "secret_text"}

    def module(self, name: str = NAME, account: str = ACCOUNT) -> bytes:
        """The bytes of the module last uploaded for the Worker."""
        return base64.b64decode(httpx.get(f"{self.url}/_standin/module/{account}/{name}", timeout=10).content)

    def calls(self) -> list[str]:
        return [
            f"{c['method']} {c['path'].removeprefix('/client/v4')} {c['status']}"
            for c in self.state()["calls"]
        ]


def main() -> None:
    parser = argparse.ArgumentParser(description="STAND-IN for Cloudflare's API (tests only)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[], help="TOKEN=PERM,PERM (edit, read, account)")
    parser.add_argument("--account", action="append", default=[], help="ID=NAME")
    parser.add_argument("--subdomain", action="append", default=[], help="ACCOUNT_ID=SUBDOMAIN (registered)")
    parser.add_argument(
        "--taken", action="append", default=[], help="a workers.dev subdomain someone else has"
    )
    args = parser.parse_args()
    state = State(
        tokens={t.partition("=")[0]: set(filter(None, t.partition("=")[2].split(","))) for t in args.token},
        accounts=dict(a.split("=", 1) for a in args.account),
        subdomains=dict(s.split("=", 1) for s in args.subdomain),
        taken=set(args.taken),
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", args.port))
    print(f"READY {sock.getsockname()[1]}", flush=True)
    web.run_app(app(state), sock=sock, print=None, access_log=None)


if __name__ == "__main__":
    main()
