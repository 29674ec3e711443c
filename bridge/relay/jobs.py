"""The asynchronous job API under ``/_relay/jobs`` (docs/protocol.md §11.8).

A client that cannot hold a connection open for a whole generation submits the request as a job,
gets an id at once, and polls or waits for the result. Jobs belong to the client key that made them;
results are kept in the relay's SQLite store for ``--job-ttl`` seconds, so they survive a relay
restart (a job still running when the relay stops is marked failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from typing import Any
from urllib.parse import parse_qs

from ..asgi import Receive, Scope, Send, client_host, json_response, read_body
from ..wire.frames import valid_method, valid_target
from .forward import Request
from .pool import Want
from .shared import Shared, SharedAnswers
from .state import RelayState
from .store import JobRecord

log = logging.getLogger("bridge.relay")

MAX_SUBMISSION = 1024 * 1024
MAX_WAIT = 60.0


class Jobs:
    """The job API: submit, list, poll or wait, delete; each job is one shared answer that nobody
    waits on, stored when it ends."""

    def __init__(self, state: RelayState, shared: SharedAnswers) -> None:
        self.state = state
        self.shared = shared
        #: job id -> set once its result is in the store
        self.running: dict[str, asyncio.Event] = {}
        abandoned = state.store.abandon_running_jobs()
        if abandoned:
            log.warning("%d job(s) were still running when the relay stopped: marked failed", abandoned)

    async def handle(self, scope: Scope, receive: Receive, send: Send, key_id: str, path: str) -> None:
        method = scope["method"]
        job_id = path.removeprefix("/_relay/jobs").strip("/")
        if not job_id:
            if method == "POST":
                body = await read_body(receive)
                if body is None:
                    return
                await self._submit(send, scope, key_id, body)
            elif method == "GET":
                jobs = [
                    {"id": i, "state": state, "created_at": _iso(created)}
                    for i, state, created in self.state.store.list_jobs(key_id)
                ]
                await json_response(send, 200, {"jobs": jobs})
            else:
                await json_response(send, 405, {"error": "use GET or POST"})
            return
        if method == "DELETE":
            found = self.state.store.delete_job(job_id, key_id)
            await json_response(send, 200 if found else 404, {"deleted": found})
            return
        if method != "GET":
            await json_response(send, 405, {"error": "use GET or DELETE"})
            return
        record = self.state.store.get_job(job_id, key_id)
        if record is None:
            await json_response(send, 404, {"error": "no such job"})
            return
        wait = _wait_seconds(scope)
        stored = self.running.get(job_id)
        if stored is not None and wait > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stored.wait(), wait)
            record = self.state.store.get_job(job_id, key_id) or record
        await json_response(send, 200, _describe(record))

    async def _submit(self, send: Send, scope: Scope, key_id: str, body: bytes) -> None:
        try:
            spec = json.loads(body)
            if not isinstance(spec, dict):
                raise ValueError("a JSON object is required")
            route = spec.get("route", self.state.config.default_route)
            method = spec.get("method", "POST")
            target = spec.get("path", "/")
            headers = spec.get("headers", {})
            payload = spec.get("body")
            if not isinstance(route, str) or not isinstance(method, str) or not isinstance(target, str):
                raise ValueError("route, method and path must be strings")
            if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
                raise ValueError("headers must be an object of strings")
            if not valid_method(method) or not valid_target(target):
                raise ValueError("invalid method or path")
        except ValueError as exc:
            await json_response(send, 400, {"error": f"invalid job: {exc}"})
            return
        if len(body) > MAX_SUBMISSION:
            await json_response(send, 413, {"error": f"job exceeds {MAX_SUBMISSION} bytes"})
            return
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        if payload is None:  # no body (on main a job without one failed with a 500)
            data = b""
        hdrs = [(k.lower(), v) for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        if data and not any(k == "content-type" for k, _ in hdrs):
            hdrs.append(("content-type", "application/json"))
        hdrs.append(("content-length", str(len(data))))
        client = client_host(scope)
        hdrs.append(("x-forwarded-for", client))
        request = Request(method.upper(), route, target, hdrs, data, client, has_body=bool(data))
        job_id = "job_" + secrets.token_urlsafe(12)
        self.state.store.expire_jobs(time.time() - self.state.config.job_ttl)
        self.state.store.add_job(job_id, key_id, {"route": route, "method": request.method, "path": target})
        shared = Shared(self.state.config.shared_max_bytes)
        self.running[job_id] = asyncio.Event()
        want = Want(route, request.model, conversation=request.conversation)
        self.shared.spawn(self._run(job_id, shared, request, want))
        await json_response(send, 202, {"id": job_id, "state": "running", "url": f"/_relay/jobs/{job_id}"})

    async def _run(self, job_id: str, shared: Shared, request: Request, want: Want) -> None:
        try:
            await self.shared.produce(shared, request, want)
        finally:
            error = shared.error or shared.refused or ("response too large" if shared.overflow else None)
            self.state.store.finish_job(
                job_id,
                "done" if error is None else "failed",
                shared.status,
                shared.headers,
                shared.text(),
                error,
            )
            stored = self.running.pop(job_id, None)
            if stored is not None:
                stored.set()


def _wait_seconds(scope: Scope) -> float:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    try:
        return max(0.0, min(MAX_WAIT, float(query.get("wait", ["0"])[0])))
    except ValueError:
        return 0.0


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _describe(record: JobRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": record.id,
        "state": record.state,
        "request": record.request,
        "created_at": _iso(record.created),
        "finished_at": _iso(record.finished),
    }
    if record.state != "running":
        out["response"] = {
            "status": record.status,
            "headers": record.headers,
            "body": record.body.decode("utf-8", "replace"),
        }
        if record.error:
            out["error"] = record.error
    return out
