"""``bridge validate``: a reproducible validation run through the relay, as a user reaches it.

It sends a fixed, versioned prompt suite (``bridge/validate/prompts/<suite>.json``: short and long
prompts, short and long answers) with the real ``ollama`` client (or the ``openai`` one for an engine that
speaks only the OpenAI API), at each concurrency level, ``repetitions`` times, at temperature 0 with
a fixed seed, after one warm-up request that is not counted. Each request carries an
``X-Request-Id`` so that the bridge's JSONL log (``--bridge-log``) can be joined to it: the report
then shows each hop (engine, bridge, client).

Every request body is made distinct by a deterministic prefix (run id, request number): the relay
joins identical temperature-0 requests into one generation, and an engine reuses a cached prompt;
either would make the numbers lie.

While it runs it polls the relay's ``/_relay/status`` for the bridges' GPU samples (VRAM over
time). It records the environment (GPU names, driver and CUDA from the bridge's NVML facts, the
Ollama version, the model digest, the GPU mode, this project's version and git commit) and writes
``results.json``; :mod:`.report` turns that into ``report.md`` and PNG plots.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hashlib
import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .. import __version__
from ..errors import ConfigError
from ..httprules import is_loopback
from ..node.metering import OLLAMA_COUNTERS, read_log
from .report import write_report
from .stats import summarize
from .suite import Case, load_suite

log = logging.getLogger("bridge.validate")

_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")


@dataclass
class Settings:
    relay_url: str
    key: str
    model: str
    out: Path
    suite: str = "v1"
    route: str = "ollama"
    api: str = "ollama"  # or "openai"
    repetitions: int | None = None
    concurrency: tuple[int, ...] | None = None
    seed: int | None = None
    gpu_mode: str = ""
    bridge_log: Path | None = None
    timeout: float = 600.0
    poll_interval: float = 1.0
    cases: tuple[str, ...] = ()  # only these case ids (all when empty)
    extra: dict[str, Any] = field(default_factory=dict)


def _shown_url(url: str) -> str:
    """The relay's URL as a report may show it: in full on loopback, else its scheme alone. A
    public relay's address is a secret of its own (the notebook saves the report with its output)."""
    parts = urlsplit(url)
    return url if is_loopback(parts.hostname or "") else f"{parts.scheme}://(not shown)"


def git_commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


class Runner:
    """One validation run; :meth:`run` returns the results dict (also written to results.json)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.suite = load_suite(settings.suite)
        if settings.cases:
            unknown = set(settings.cases) - {c.id for c in self.suite.cases}
            if unknown:
                raise ConfigError(f"no case(s) {sorted(unknown)} in suite {self.suite.version}")
        self.cases = tuple(c for c in self.suite.cases if not settings.cases or c.id in settings.cases)
        self.seed = settings.seed if settings.seed is not None else self.suite.seed
        self.repetitions = settings.repetitions or self.suite.repetitions
        self.concurrency = settings.concurrency or self.suite.concurrency
        if self.repetitions < 1 or not self.concurrency or min(self.concurrency) < 1:
            raise ConfigError("repetitions and concurrency levels must be >= 1")
        if settings.api not in ("ollama", "openai"):
            raise ConfigError(f"--api {settings.api!r}: expected ollama or openai")
        base = settings.relay_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"--relay-url {settings.relay_url!r}: expected http(s)://")
        self.base = base
        self.route_url = f"{base}/r/{settings.route}"
        self.auth = {"Authorization": f"Bearer {settings.key}"}
        #: A run id: distinct prefixes between runs, reproducible within one (seed + time).
        self.run_id = hashlib.sha256(f"{self.seed}-{time.time_ns()}".encode()).hexdigest()[:8]
        self.t0 = 0.0
        self.samples: list[dict[str, Any]] = []
        self._seen_samples: set[tuple[str, float]] = set()

    # ------------------------------------------------------------------------------ clients
    def _http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(headers=self.auth, timeout=httpx.Timeout(self.s.timeout, connect=30))

    async def _one(self, client: Any, case: Case, rid: str, prompt: str) -> dict[str, Any]:
        """One request, measured as the client sees it."""
        _request_id.set(rid)
        rec: dict[str, Any] = {"request_id": rid, "case": case.id, "prompt_kind": case.prompt_kind}
        rec["max_tokens"] = case.max_tokens
        rec["prompt_chars"] = len(prompt)
        start = time.monotonic()
        rec["t_start"] = round(start - self.t0, 6)
        first: float | None = None
        last: float | None = None
        pieces = 0
        try:
            if self.s.api == "ollama":
                stream = await client.chat(
                    model=self.s.model,
                    messages=[{"role": "user", "content": prompt}],
                    stream=True,
                    options={
                        "temperature": self.suite.temperature,
                        "seed": self.seed,
                        "num_predict": case.max_tokens,
                    },
                )
                async for part in stream:
                    msg = part.message
                    text = (msg.content or "") + (getattr(msg, "thinking", None) or "") if msg else ""
                    now = time.monotonic()
                    if text:
                        pieces += 1
                        first = first or now
                        last = now
                    if part.done:
                        for key in OLLAMA_COUNTERS:
                            value = getattr(part, key, None)
                            if isinstance(value, int):
                                rec[key] = value
            else:
                stream = await client.chat.completions.create(
                    model=self.s.model,
                    messages=[{"role": "user", "content": prompt}],
                    stream=True,
                    temperature=self.suite.temperature,
                    seed=self.seed,
                    max_tokens=case.max_tokens,
                    stream_options={"include_usage": True},
                    extra_headers={"X-Request-Id": rid},
                )
                async for chunk in stream:
                    now = time.monotonic()
                    for choice in chunk.choices:
                        if choice.delta and choice.delta.content:
                            pieces += 1
                            first = first or now
                            last = now
                    if chunk.usage is not None:
                        rec["eval_count"] = chunk.usage.completion_tokens
                        rec["prompt_eval_count"] = chunk.usage.prompt_tokens
            rec["ok"] = True
        except Exception as exc:  # a failed request is a result too
            rec["ok"] = False
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        end = time.monotonic()
        rec["total_s"] = round(end - start, 6)
        if first is not None:
            rec["ttft_s"] = round(first - start, 6)
        rec["chunks"] = pieces
        completion = rec.get("eval_count", pieces)
        rec["completion_tokens"] = completion
        if "prompt_eval_count" in rec:
            rec["prompt_tokens"] = rec["prompt_eval_count"]
        if rec.get("eval_duration") and rec.get("eval_count"):
            rec["tokens_per_s"] = round(rec["eval_count"] / (rec["eval_duration"] / 1e9), 3)
            rec["tokens_per_s_source"] = "engine"
        if first is not None and last is not None and last > first and pieces > 1:
            rec["tokens_per_s_client"] = round((pieces - 1) / (last - first), 3)
            if "tokens_per_s" not in rec:
                rec["tokens_per_s"] = rec["tokens_per_s_client"]
                rec["tokens_per_s_source"] = "client"
        if rec.get("prompt_eval_duration") and rec.get("prompt_eval_count"):
            rec["prompt_tokens_per_s"] = round(
                rec["prompt_eval_count"] / (rec["prompt_eval_duration"] / 1e9), 3
            )
        return rec

    def _request_id(self, n: int) -> str:
        """Request ``n``'s ``X-Request-Id`` (0: the warm-up): the run id and the number, shaped as a
        UUID, because llama-cpp-python's server answers 400 to any ``X-Request-Id`` that is not one."""
        return f"{self.run_id}-0000-4000-8000-{n:012d}"

    def _prompt(self, case: Case, n: int) -> str:
        return f"[validation {self.run_id} request {n}] {case.prompt}"

    # ------------------------------------------------------------------------------ environment
    async def _environment(self, http: httpx.AsyncClient) -> dict[str, Any]:
        env: dict[str, Any] = {
            "project_version": __version__,
            "git_commit": git_commit(),
            "python": platform.python_version(),
            "client_host": platform.node(),
            "relay_url": _shown_url(self.base),
            "route": self.s.route,
            "api": self.s.api,
            "model": self.s.model,
            "gpu_mode": self.s.gpu_mode,
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await http.get(f"{self.route_url}/api/version")
            if r.status_code == 200:
                answer = r.json()
                env["ollama_version"] = answer.get("version", "")
                if answer.get("served_by"):  # the bridge's own Ollama API (bridge/ollama), not an Ollama
                    env["ollama_served_by"] = answer["served_by"]
        with contextlib.suppress(httpx.HTTPError, ValueError):
            if self.s.api == "ollama":
                r = await http.get(f"{self.route_url}/api/tags")
                names = {self.s.model, self.s.model + ":latest"}
                for m in r.json().get("models", []) if r.status_code == 200 else []:
                    if m.get("name") in names or m.get("model") in names:
                        env["model_digest"] = m.get("digest", "")
                        details = m.get("details") or {}
                        env["model_quantization"] = details.get("quantization_level", "")
                        env["model_parameters"] = details.get("parameter_size", "")
                        env["model_size_bytes"] = m.get("size")
            else:
                r = await http.get(f"{self.route_url}/v1/models")
                if r.status_code == 200:
                    env["models"] = [m.get("id") for m in r.json().get("data", [])]
        status = await self._status(http)
        nodes = []
        for node in status.get("nodes_detail", []) if status else []:
            facts = node.get("facts") or {}
            nodes.append(
                {
                    "node": node.get("node"),
                    "software": facts.get("software") or (node.get("info") or {}).get("software"),
                    "gpus": facts.get("gpus", []),
                    "driver": facts.get("driver", ""),
                    "cuda": facts.get("cuda", ""),
                    "gpu_mode": facts.get("gpu_mode", ""),
                    "no_gpu": facts.get("no_gpu", ""),
                    "upstreams": facts.get("upstreams", []),
                }
            )
        env["nodes"] = nodes
        if not env["gpu_mode"]:
            modes = sorted({n["gpu_mode"] for n in nodes if n["gpu_mode"]})
            env["gpu_mode"] = ",".join(modes)
        if status:
            env["relay_version"] = status.get("version", "")
        return env

    async def _status(self, http: httpx.AsyncClient) -> dict[str, Any] | None:
        try:
            r = await http.get(f"{self.base}/_relay/status")
            data = r.json() if r.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    async def _poll_samples(self, http: httpx.AsyncClient) -> None:
        while True:
            status = await self._status(http)
            for node in status.get("nodes_detail", []) if status else []:
                sample = node.get("sample")
                if not isinstance(sample, dict):
                    continue
                key = (str(node.get("node")), float(sample.get("received_at", 0)))
                if key in self._seen_samples:
                    continue
                self._seen_samples.add(key)
                self.samples.append(
                    {"t": round(time.monotonic() - self.t0, 3), "node": node.get("node"), **sample}
                )
            await asyncio.sleep(self.s.poll_interval)

    # ------------------------------------------------------------------------------ the run
    async def run(self) -> dict[str, Any]:
        out = self.s.out
        out.mkdir(parents=True, exist_ok=True)
        async with self._http() as http:
            client: Any
            if self.s.api == "ollama":
                ollama = _client_module("ollama")
                client = ollama.AsyncClient(
                    host=self.route_url,
                    headers=self.auth,
                    timeout=self.s.timeout,
                    event_hooks={"request": [self._hook]},
                )
            else:
                openai = _client_module("openai")
                client = openai.AsyncOpenAI(
                    base_url=f"{self.route_url}/v1", api_key=self.s.key, timeout=self.s.timeout, max_retries=0
                )
            env = await self._environment(http)
            self.t0 = time.monotonic()
            poller = asyncio.create_task(self._poll_samples(http))
            try:
                log.info("warm-up request (not counted)")
                warm = await self._one(
                    client, self.suite.warmup, self._request_id(0), self._prompt(self.suite.warmup, 0)
                )
                if not warm["ok"]:
                    raise ConfigError(f"the warm-up request failed: {warm.get('error')}")
                results, batches = await self._levels(client)
            finally:
                poller.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await poller
                status = await self._status(http)
                if status:
                    await self._take_final_sample(status)
        if self.s.bridge_log is not None:
            if self.s.bridge_log.is_file():
                matched = join_bridge_log(results, self.s.bridge_log)
                log.info("joined %d of %d requests to the bridge's log", matched, len(results))
            else:
                log.warning("no bridge log at %s: the report shows the client's side only", self.s.bridge_log)
        data: dict[str, Any] = {
            "format": "kaggle-bridge-validation/1",
            "run_id": self.run_id,
            "suite": {
                "version": self.suite.version,
                "sha256": self.suite.sha256,
                "temperature": self.suite.temperature,
                "seed": self.seed,
                "repetitions": self.repetitions,
                "concurrency": list(self.concurrency),
                "cases": [
                    {"id": c.id, "prompt_kind": c.prompt_kind, "max_tokens": c.max_tokens} for c in self.cases
                ],
            },
            "environment": env,
            "warmup": warm,
            "requests": results,
            "batches": batches,
            "samples": self.samples,
            "summary": summarize(results, batches),
        }
        (out / "results.json").write_text(json.dumps(data, indent=1))
        return data

    async def _hook(self, request: httpx.Request) -> None:
        """Give the request the id of the measurement it belongs to (a context variable: the
        ollama client has no per-request headers)."""
        rid = _request_id.get()
        if rid:
            request.headers["X-Request-Id"] = rid

    async def _take_final_sample(self, status: dict[str, Any]) -> None:
        for node in status.get("nodes_detail", []):
            sample = node.get("sample")
            if isinstance(sample, dict):
                key = (str(node.get("node")), float(sample.get("received_at", 0)))
                if key not in self._seen_samples:
                    self._seen_samples.add(key)
                    self.samples.append(
                        {"t": round(time.monotonic() - self.t0, 3), "node": node.get("node"), **sample}
                    )

    async def _levels(self, client: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        results: list[dict[str, Any]] = []
        batches: list[dict[str, Any]] = []
        n = 0
        for level in self.concurrency:
            for rep in range(self.repetitions):
                for case in self.cases:
                    coros = []
                    for _slot in range(level):
                        n += 1
                        rid = self._request_id(n)
                        coros.append(self._one(client, case, rid, self._prompt(case, n)))
                    start = time.monotonic()
                    done = await asyncio.gather(*coros)
                    wall = time.monotonic() - start
                    tokens = 0
                    for slot, rec in enumerate(done):
                        rec.update(concurrency=level, repetition=rep, slot=slot)
                        tokens += rec["completion_tokens"] if rec["ok"] else 0
                        results.append(rec)
                    batches.append(
                        {
                            "case": case.id,
                            "concurrency": level,
                            "repetition": rep,
                            "wall_s": round(wall, 6),
                            "completion_tokens": tokens,
                            "throughput_tokens_per_s": round(tokens / wall, 3) if wall > 0 else 0.0,
                            "errors": sum(1 for r in done if not r["ok"]),
                        }
                    )
                    log.info(
                        "concurrency %d rep %d %s: %d ok, %.1f tok/s aggregate",
                        level,
                        rep,
                        case.id,
                        level - batches[-1]["errors"],
                        batches[-1]["throughput_tokens_per_s"],
                    )
        return results, batches


def join_bridge_log(results: list[dict[str, Any]], path: Path) -> int:
    """Attach the bridge's own record (by X-Request-Id) to each result; returns how many matched."""
    by_id = {r["request_id"]: r for r in read_log(path) if r.get("kind") == "request" and r.get("request_id")}
    matched = 0
    for rec in results:
        b = by_id.get(rec["request_id"])
        if b is None:
            continue
        matched += 1
        rec["bridge"] = {
            k: b[k]
            for k in (
                "ttft_s",
                "total_s",
                "queue_s",
                "tokens_per_s",
                "tokens_per_s_bridge",
                "completion_tokens",
                "prompt_tokens",
                "engine_wait_s",
                "upstream",
                "via",
            )
            if k in b
        }
        if "ttft_s" in rec and "ttft_s" in b:
            rec["tunnel_ttft_overhead_s"] = round(rec["ttft_s"] - b["ttft_s"], 6)
        if rec.get("tokens_per_s_source") != "engine":
            # No engine counters reached the client (an OpenAI-style stream): the bridge's figure,
            # taken next to the engine (its counters if it sent any, else its clock), replaces the
            # client's, which includes the tunnel's jitter; none when the bridge could not time it.
            rec.pop("tokens_per_s", None)
            rec.pop("tokens_per_s_source", None)
            if "tokens_per_s" in b:
                rec["tokens_per_s"] = b["tokens_per_s"]
                rec["tokens_per_s_source"] = "bridge"
        if "prompt_tokens" not in rec and "prompt_tokens" in b:
            rec["prompt_tokens"] = b["prompt_tokens"]
    return matched


def run(settings: Settings) -> dict[str, Any]:
    """Run, write results.json, report.md and the plots; return the results."""
    for name in ("httpx", "httpx2", "openai"):  # one line per request from the clients is noise here
        logging.getLogger(name).setLevel(logging.WARNING)
    data = asyncio.run(Runner(settings).run())
    write_report(data, settings.out)
    return data


def _client_module(name: str) -> Any:
    """The real client library of ``--api`` (``ollama`` or ``openai``), or a clear error naming the
    install that brings it."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(
            f"--api {name} needs the {name} client: pip install 'kaggle-bridge[validate]'"
        ) from exc
