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
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from ..asgi import Receive, Scope, Send, client_host, json_response, text_headers
from ..config import ROUTE_NAME
from ..httprules import forward_headers, valid_header_field
from ..wire.frames import valid_method, valid_target
from .auth import KeyStreams
from .bodies import BodyRefused, read_small_body, refuse_body
from .forward import Request
from .pool import Want
from .shared import Shared, SharedAnswers
from .state import RelayState
from .store import JobRecord
from .users import Users

log = logging.getLogger("bridge.relay")

MAX_SUBMISSION = 1024 * 1024
MAX_WAIT = 60.0


class Jobs:
    """The job API: submit, list, poll or wait, delete; each job is one shared answer that nobody
    waits on, stored when it ends."""

    def __init__(
        self,
        state: RelayState,
        shared: SharedAnswers,
        streams: KeyStreams | None = None,
        users: Users | None = None,
    ) -> None:
        self.state = state
        self.shared = shared
        #: A running job is one of its key's streams (--key-streams).
        self.streams = streams or KeyStreams(0)
        self.users = users or Users(state.config, state.store)
        #: job id -> set once its result is in the store
        self.running: dict[str, asyncio.Event] = {}
        abandoned = state.store.abandon_running_jobs()
        if abandoned:
            log.warning("%d job(s) were still running when the relay stopped: marked failed", abandoned)

    async def handle(self, scope: Scope, receive: Receive, send: Send, key_id: str, path: str) -> None:
        method = scope["method"]
        # Expired results go on every request, not at some later sweep: --job-ttl counts from a
        # job's finish, and an expired job is never shown (issue 22).
        self.state.store.expire_jobs(time.time() - self.state.config.job_ttl)
        job_id = path.removeprefix("/_relay/jobs").strip("/")
        if not job_id:
            if method == "POST":
                body = await read_small_body(
                    text_headers(scope["headers"]), receive, MAX_SUBMISSION, self.state.config.body_timeout
                )
                if body is None:
                    return  # the client went away
                if isinstance(body, BodyRefused):
                    await refuse_body(send, body)
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
        spec = parse_job(body, self.state.config.default_route)
        if isinstance(spec, str):
            await json_response(send, 400, {"error": f"invalid job: {spec}"})
            return
        refusal = self.quota_refusal(key_id)
        if refusal is not None:
            await json_response(send, 429, {"error": refusal})
            return
        route, method, target, data = spec.route, spec.method, spec.path, spec.body
        hdrs = list(spec.headers)
        if data and not any(k == "content-type" for k, _ in hdrs):
            hdrs.append(("content-type", "application/json"))
        hdrs.append(("content-length", str(len(data))))
        client = client_host(scope)
        # Through the same rule as a client's request (docs/security.md §5): the job's own
        # forwarding and hop-by-hop headers go, the relay's X-Forwarded-* are the only ones.
        hdrs = forward_headers(
            hdrs, client=client, https=scope.get("scheme") == "https", prefix="", drop_bearer=False
        )
        hdrs = self.users.headers(hdrs, route, key_id)
        request = Request(method.upper(), route, target, hdrs, data, client, has_body=bool(data))
        job_id = "job_" + secrets.token_urlsafe(12)
        self.state.store.add_job(job_id, key_id, {"route": route, "method": request.method, "path": target})
        shared = Shared(self.state.config.shared_max_bytes)
        self.running[job_id] = asyncio.Event()
        want = Want(route, request.model, conversation=request.conversation)
        self.shared.spawn(self._run(job_id, key_id, shared, request, want))
        await json_response(send, 202, {"id": job_id, "state": "running", "url": f"/_relay/jobs/{job_id}"})

    async def _run(self, job_id: str, key_id: str, shared: Shared, request: Request, want: Want) -> None:
        acquired = False
        try:
            await self.streams.wait(key_id)  # a running job is one of its key's streams
            acquired = True
            await self.shared.produce(shared, request, want)
        finally:
            if acquired:
                self.streams.release(key_id)
            error = shared.error or shared.refused or ("response too large" if shared.overflow else None)
            if not shared.done:  # stopped before it ran (the relay shuts down)
                error = error or "the relay stopped before the job ran"
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

    def quota_refusal(self, key_id: str) -> str | None:
        """Why ``key_id`` may not submit another job now (``--job-quota``, ``--job-bytes``), or None."""
        cfg = self.state.config
        count, stored = self.state.store.job_usage(key_id)
        if cfg.job_quota and count >= cfg.job_quota:
            return f"job quota reached: this key keeps {count} jobs (at most {cfg.job_quota}); delete some"
        if cfg.job_bytes and stored >= cfg.job_bytes:
            return (
                f"job storage quota reached: this key's results hold {stored} bytes "
                f"(at most {cfg.job_bytes}); delete some"
            )
        return None


@dataclass(frozen=True, slots=True)
class JobSpec:
    """A job as submitted: the request a node gets (headers without Host and Content-Length)."""

    route: str
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes


#: Request headers a job may not set: the relay frames the body itself.
_JOB_DROPPED = frozenset({"host", "content-length", "transfer-encoding"})


def parse_job(submission: bytes, default_route: str) -> JobSpec | str:
    """A submission (a JSON object: ``route``, ``method``, ``path``, ``headers``, ``body``, each
    optional) as a job, or why it is none (the 400's words). A missing or null ``body`` is an
    empty body; a string is sent as it is (UTF-8), anything else as JSON."""
    try:
        spec = json.loads(submission)
    except (ValueError, UnicodeDecodeError):
        return "the body is not JSON"
    if not isinstance(spec, dict):
        return "a JSON object is required"
    route = spec.get("route", default_route)
    method = spec.get("method", "POST")
    target = spec.get("path", "/")
    headers = spec.get("headers", {})
    payload = spec.get("body")
    if not isinstance(route, str) or not isinstance(method, str) or not isinstance(target, str):
        return "route, method and path must be strings"
    if not ROUTE_NAME.match(route):
        return f"invalid route {route[:64]!r}"
    if not valid_method(method) or not valid_target(target):
        return "invalid method or path"
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        return "headers must be an object of strings"
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not valid_header_field(name, value):
            return f"invalid header {name[:64]!r}"
        if name.lower() not in _JOB_DROPPED:
            out.append((name.lower(), value))
    if payload is None:
        data = b""
    elif isinstance(payload, str):
        data = payload.encode()
    else:
        data = json.dumps(payload).encode()
    return JobSpec(route, method.upper(), target, tuple(out), data)


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
