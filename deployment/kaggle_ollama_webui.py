"""Kaggle deployment: Ollama (or the embedded llama.cpp engine) + Open WebUI + the bridge, supervised.

One command takes a fresh Kaggle GPU notebook (2x T4, 12 h session, internet on) to a private
service reachable through the relay; where Ollama cannot run (no GPU, no internet: CI, a laptop) the
same code runs the whole stack on an embedded engine (llama.cpp via ``deployment/engine.py``, on a
tiny generated model or ``--model-file``), with a local relay when none is configured::

    python -m deployment                      # auto: Ollama with a GPU, else embedded; Ctrl-C drains
    python -m deployment --mode embedded      # what scripts/run.sh runs
    python -m deployment doctor               # what is wrong here, each problem with its fix
    python -m deployment status | stop        # the deployment in --state-dir

In a notebook, ``deployment.notebook.serve()`` runs it in the cell and keeps serving with one live
status line until the session's end (notebooks/kaggle_ollama_webui.ipynb).

Every flag is also an environment variable (``--help`` shows which): ``BRIDGE_*`` for what the
bridge shares with its other commands (relay URL, node token, client key), ``DEPLOY_*`` for the
rest. Secrets (``BRIDGE_NODE_TOKEN``, ``BRIDGE_KEY``, ``DEPLOY_WEBUI_ADMIN_PASSWORD``,
``BRIDGE_RELAY``, the Kaggle CLI's and Cloudflare's) come from the environment or Kaggle Secrets,
never from the notebook's text, and are never printed. See deployment/README.md for the choices (GPU
modes, flash attention, KV cache) and docs/kaggle.md for a first real run.

The children (local relay, engine or Ollama servers, bridge, Open WebUI) run under an asyncio
supervisor: each is started when the previous one is healthy, health-checked every few seconds, and
restarted with exponential backoff when it exits or stops answering. Every process is recorded in
``<state>/children.json`` the moment it starts (deployment/children.py): a run that dies midway
leaves nothing the next run does not stop. On the way out, 5 minutes before the session's end, or
once the next session's bridge has connected, the bridge drains (the relay then holds new requests
for, or sends them to, the next bridge).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import httpx

from deployment import gpus as gpumod
from deployment import handover, ollama_setup, webui_setup
from deployment.children import AlreadyRunning, Cancelled, Children, run_recorded, tail
from deployment.engine import free_port
from deployment.session import (
    Deadline,
    GpuHours,
    KagglePaths,
    Redactor,
    get_secret,
    kaggle_root,
    mask,
    on_kaggle,
    session_start,
)
from deployment.supervisor import ChildSpec, Supervisor

#: The checkout this code runs from (when it runs from one: ``.venv-webui``, ``pip install``).
ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_ROUTE = "engine"
OLLAMA_ROUTE = "ollama"
DEFAULT_OLLAMA_MODEL = "qwen3:8b"


def code_root() -> Path:
    """The folder holding the ``bridge`` package this process imports: the children run
    ``python -m bridge.cli`` from there, so they run the same code (a clone in the notebook's
    working directory, or an installed copy)."""
    spec = importlib.util.find_spec("bridge")
    if spec is None or spec.origin is None:
        return ROOT
    return Path(spec.origin).resolve().parent.parent


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
#: ``BRIDGE_RELAY`` is (issue 19's one-step deploy); tests may replace it.
CLOUDFLARE_DEPLOY: Callable[[CloudflareRequest], RelayTarget] | None = deploy_cloudflare
#: Holds the ``BRIDGE_RELAY`` a run exported for `bridge validate` (``--export-env``) when the user
#: had set none, so that a later run in the same kernel does not take it for the user's setting.
EXPORTED_RELAY = "DEPLOY_EXPORTED_RELAY"


# ---------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """Everything the deployment reads; ``argparse`` fills it (flag, else environment, else default)."""

    mode: str = "auto"
    relay: str = ""
    node_token: str = ""
    key: str = ""
    relay_host: str = "127.0.0.1"
    relay_port: int = 0
    node_name: str = ""
    kaggle_root: Path = field(default_factory=kaggle_root)
    state_dir: Path = Path()
    cache_dir: Path = Path()
    reports_dir: Path = Path()
    model: str = ""
    model_file: str = ""
    chat_format: str = "auto"
    engine_queue: int = 16
    gpu_mode: str = "auto"
    num_ctx: int = 8192
    num_parallel: int = 2
    kv_cache_type: str = "q8_0"
    flash_attention: bool = True
    ollama: str = ""
    ollama_version: str = ollama_setup.OLLAMA_VERSION
    ollama_url: str = ""
    ollama_sha256: str = ""
    ollama_port: int = 11434
    webui: str = "auto"
    webui_venv: str = ""
    webui_version: str = webui_setup.OPEN_WEBUI_VERSION
    webui_port: int = 0
    webui_admin_email: str = "admin@localhost"
    webui_admin_password: str = ""
    listen_port: int = 0
    session_hours: float = -1.0
    session_start: float = 0.0
    serve_minutes: float = 0.0
    warn_minutes: str = "60,30,10"
    drain_minutes: float = 5.0
    drain_timeout: float = 30.0
    next_kernel: str = ""
    next_accelerator: str = handover.T4X2
    next_session_cmd: str = ""
    cloudflare: str = "auto"
    validate: bool = False
    validate_args: str = ""
    gpu_hours_file: str = ""
    status_interval: float = 600.0
    health_interval: float = 5.0
    ready_timeout: float = 300.0
    export_env: str = "auto"
    background: str = "auto"

    def secrets(self) -> list[str]:
        return [self.node_token, self.key, self.webui_admin_password]


#: Settings whose value is a secret: never shown, not even in --help.
SECRET_SETTINGS = ("node_token", "key", "webui_admin_password")


#: flag -> (env variable, help). The env variable's prefix says who else reads it.
_FLAGS: dict[str, tuple[str, str]] = {
    "mode": (
        "DEPLOY_MODE",
        "ollama (the real path, needs a GPU and internet), embedded (llama.cpp), or auto",
    ),
    "relay": ("BRIDGE_RELAY", "the relay's URL (ws(s):// or http(s)://); empty: start a local relay"),
    "node_token": (
        "BRIDGE_NODE_TOKEN",
        "secret the bridge presents to the relay (generated for a local relay)",
    ),
    "key": ("BRIDGE_KEY", "a client key of the remote relay, for the status line (masked) and validation"),
    "relay_host": ("DEPLOY_RELAY_HOST", "local relay: address to listen on"),
    "relay_port": ("DEPLOY_RELAY_PORT", "local relay: port (0: a free one)"),
    "node_name": ("BRIDGE_NODE_NAME", "this node's name in the relay's status (default: hostname)"),
    "kaggle_root": ("DEPLOY_KAGGLE_ROOT", "where Kaggle's working/ and temp/ folders are"),
    "state_dir": (
        "DEPLOY_STATE_DIR",
        "secrets, logs, relay data, Open WebUI's database, status.json "
        "(Kaggle: <root>/temp/kaggle-bridge, never saved; else .data/deploy)",
    ),
    "cache_dir": (
        "DEPLOY_CACHE_DIR",
        "downloads, the Ollama install, models, Open WebUI's venv "
        "(Kaggle: <root>/temp/kaggle-bridge-cache; else <state>/cache)",
    ),
    "reports_dir": (
        "DEPLOY_REPORTS_DIR",
        "what to keep: validation reports, the GPU-hours record "
        "(Kaggle: <root>/working/kaggle-bridge, saved with the notebook; else <state>/reports)",
    ),
    "model": (
        "DEPLOY_MODEL",
        f"model to serve (Ollama: default {DEFAULT_OLLAMA_MODEL}; embedded: the file's)",
    ),
    "model_file": (
        "DEPLOY_MODEL_FILE",
        "embedded: a GGUF file, `gemma` (Gemma 3 270M from PyPI, scripts/setup.d/35-gemma.sh; Gemma Terms "
        "of Use: https://ai.google.dev/gemma/terms) or `tiny` (a generated test model: random words); "
        "default: gemma where installed, else tiny",
    ),
    "chat_format": (
        "DEPLOY_CHAT_FORMAT",
        "embedded: llama-cpp-python's chat format; auto: the file's template, else `dialogue` (base models)",
    ),
    "engine_queue": (
        "DEPLOY_ENGINE_QUEUE",
        "embedded: requests running or waiting beyond which the engine answers 503 + Retry-After "
        "(0: no bound)",
    ),
    "gpu_mode": ("DEPLOY_GPU_MODE", "split (one Ollama over all GPUs), replicas (one per GPU), or auto"),
    "num_ctx": ("DEPLOY_NUM_CTX", "context length per request (OLLAMA_CONTEXT_LENGTH / the engine's n_ctx)"),
    "num_parallel": ("DEPLOY_NUM_PARALLEL", "requests each Ollama serves at once (OLLAMA_NUM_PARALLEL)"),
    "kv_cache_type": (
        "DEPLOY_KV_CACHE_TYPE",
        "f16, q8_0 or q4_0 (OLLAMA_KV_CACHE_TYPE; needs flash attention)",
    ),
    "flash_attention": ("DEPLOY_FLASH_ATTENTION", "1/0: OLLAMA_FLASH_ATTENTION"),
    "ollama": (
        "DEPLOY_OLLAMA",
        "the ollama executable (a path or a name on PATH); default: PATH, else install",
    ),
    "ollama_version": ("DEPLOY_OLLAMA_VERSION", "Ollama release to install"),
    "ollama_url": ("DEPLOY_OLLAMA_URL", "download URL of the release archive (default: GitHub releases)"),
    "ollama_sha256": (
        "DEPLOY_OLLAMA_SHA256",
        "the archive's sha256 (default: the release's sha256sum.txt; skip: do not verify)",
    ),
    "ollama_port": (
        "DEPLOY_OLLAMA_PORT",
        "port of the first Ollama; replica i listens on port + i (0: free ports)",
    ),
    "webui": ("DEPLOY_WEBUI", "on, off, or auto (Ollama: install; embedded: only when installed)"),
    "webui_venv": (
        "DEPLOY_WEBUI_VENV",
        "Open WebUI's venv (default: .venv-webui in the repo if there, else <cache>)",
    ),
    "webui_version": ("DEPLOY_WEBUI_VERSION", "Open WebUI version from PyPI"),
    "webui_port": ("DEPLOY_WEBUI_PORT", "Open WebUI's port on loopback (0: a free one)"),
    "webui_admin_email": ("DEPLOY_WEBUI_ADMIN_EMAIL", "Open WebUI's admin account"),
    "webui_admin_password": (
        "DEPLOY_WEBUI_ADMIN_PASSWORD",
        "its password (secret; generated into <state> when empty)",
    ),
    "listen_port": ("DEPLOY_LISTEN_PORT", "port of the bridge's local endpoint (0: a free one)"),
    "session_hours": (
        "DEPLOY_SESSION_HOURS",
        "session length in hours (-1: 12 on Kaggle, none elsewhere; 0: none)",
    ),
    "session_start": (
        "DEPLOY_SESSION_START",
        "session start, epoch seconds (default: on Kaggle the container's start, else this process's)",
    ),
    "serve_minutes": (
        "DEPLOY_SERVE_MINUTES",
        "stop (draining first) this many minutes after READY, to spend fewer GPU hours "
        "(0: at the session's end)",
    ),
    "warn_minutes": ("DEPLOY_WARN_MINUTES", "warn this many minutes before the end (comma-separated)"),
    "drain_minutes": ("DEPLOY_DRAIN_MINUTES", "drain the bridge this many minutes before the end"),
    "drain_timeout": (
        "BRIDGE_DRAIN_TIMEOUT",
        "seconds the bridge lets requests in flight finish when stopping",
    ),
    "next_kernel": (
        "DEPLOY_NEXT_KERNEL",
        "USER/SLUG of this notebook: at the first warning push it as the next session "
        "(KAGGLE_USERNAME/KAGGLE_KEY from Kaggle Secrets) and drain once its bridge connects",
    ),
    "next_accelerator": ("DEPLOY_NEXT_ACCELERATOR", "the next session's accelerator (kaggle kernels push)"),
    "next_session_cmd": (
        "DEPLOY_NEXT_SESSION_CMD",
        "shell command run at the first warning instead of the push (its output is logged, redacted)",
    ),
    "cloudflare": (
        "DEPLOY_CLOUDFLARE",
        "auto/on/off: deploy the relay on Cloudflare when CLOUDFLARE_API_TOKEN is set "
        "and BRIDGE_RELAY is not",
    ),
    "validate": (
        "DEPLOY_VALIDATE",
        "1/0: run `bridge validate` through the relay once READY (a report to keep)",
    ),
    "validate_args": ("DEPLOY_VALIDATE_ARGS", "extra arguments for `bridge validate`, e.g. --case short-64"),
    "gpu_hours_file": (
        "DEPLOY_GPU_HOURS_FILE",
        "JSON record of sessions (default: <reports>/gpu_hours.json)",
    ),
    "status_interval": (
        "DEPLOY_STATUS_INTERVAL",
        "seconds between status lines in a log (a terminal or notebook updates one line in place)",
    ),
    "health_interval": ("DEPLOY_HEALTH_INTERVAL", "seconds between health checks"),
    "ready_timeout": ("DEPLOY_READY_TIMEOUT", "seconds a child may take to become healthy"),
    "export_env": (
        "DEPLOY_EXPORT_ENV",
        "on/off/auto: set BRIDGE_RELAY, BRIDGE_KEY, ... for `bridge validate`",
    ),
    "background": (
        "DEPLOY_BACKGROUND",
        "on/off/auto: run the supervisor in a thread and return when ready "
        "(auto: under a running event loop)",
    ),
}


def _truthy(value: str | bool) -> bool:
    return value if isinstance(value, bool) else value.strip().lower() in ("1", "true", "yes", "on")


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = dict(os.environ if env is None else env)
    ap = argparse.ArgumentParser(
        prog="python -m deployment",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Commands besides running the stack (`up`, the default): `status`, `stop` (the "
        "deployment in --state-dir), `doctor` (check this machine; safe to paste) and `report DIR` "
        "(show a `bridge validate` report).",
    )
    defaults = Settings()
    for f in fields(Settings):
        var, text = _FLAGS[f.name]
        flag = "--" + f.name.replace("_", "-")
        default: Any = getattr(defaults, f.name)
        raw = env.get(var)
        kind: Any = {"int": int, "float": float, "Path": Path}.get(str(f.type), str)
        if str(f.type) == "bool":
            value = _truthy(raw) if raw is not None else default
            ap.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=value,
                help=f"{text} [env {var}; default {value}]",
            )
            continue
        value = kind(raw) if raw not in (None, "") else default
        shown = "(secret)" if f.name in SECRET_SETTINGS else value
        if f.name in ("state_dir", "cache_dir", "reports_dir") and value == Path():
            shown = "see above"
        ap.add_argument(
            flag, dest=f.name, type=kind, default=value, help=f"{text} [env {var}; default {shown}]"
        )
    return ap


def parse_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Flags, else ``env`` (default: the environment), else the defaults; then the secrets from
    Kaggle Secrets and the folders' defaults (on Kaggle: secrets and caches under the unsaved
    ``<root>/temp``, only reports under the saved ``<root>/working``)."""
    env = dict(os.environ if env is None else env)
    if env.get("BRIDGE_RELAY") and env.get("BRIDGE_RELAY") == env.get(EXPORTED_RELAY):
        del env["BRIDGE_RELAY"]  # exported by an earlier run (a local relay, now gone), not set by the user
    args = build_parser(env).parse_args(argv)
    s = Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    for name, var in (
        ("node_token", "BRIDGE_NODE_TOKEN"),
        ("key", "BRIDGE_KEY"),
        ("webui_admin_password", "DEPLOY_WEBUI_ADMIN_PASSWORD"),
        ("relay", "BRIDGE_RELAY"),
    ):
        if not getattr(s, name):
            setattr(s, name, get_secret(var, {}))  # Kaggle Secrets (the environment was read above)
    kaggle = on_kaggle({**env, "DEPLOY_KAGGLE_ROOT": str(s.kaggle_root)})
    paths = KagglePaths(s.kaggle_root)
    if s.state_dir == Path():
        s.state_dir = paths.state if kaggle else ROOT / ".data" / "deploy"
    if s.cache_dir == Path():
        s.cache_dir = paths.cache if kaggle else s.state_dir / "cache"
    if s.reports_dir == Path():
        s.reports_dir = paths.reports if kaggle else s.state_dir / "reports"
    for choice, allowed in (
        (s.mode, ("auto", "ollama", "embedded")),
        (s.gpu_mode, ("auto", "split", "replicas")),
        (s.kv_cache_type, tuple(gpumod.KV_BYTES)),
        (s.webui, ("auto", "on", "off")),
        (s.cloudflare, ("auto", "on", "off")),
    ):
        if choice not in allowed:
            raise SystemExit(f"error: {choice!r}: expected one of {', '.join(allowed)}")
    return s


def in_notebook() -> bool:
    """True inside IPython/Jupyter, or wherever an event loop runs in this thread."""
    if "ipykernel" in sys.modules or "IPython" in sys.modules:
        with contextlib.suppress(Exception):
            ipython: Any = importlib.import_module("IPython")
            if ipython.get_ipython() is not None:
                return True
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def _child_env(**extra: str) -> dict[str, str]:
    """Our environment without the BRIDGE_*/DEPLOY_* settings (each child gets its flags
    explicitly) plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "DEPLOY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def ensure_bridge(
    say: Callable[[str], None],
    *,
    log: Path,
    children: Children | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """The bridge's dependencies in this interpreter: on a fresh Kaggle kernel ``pip install`` of
    this checkout, once (Kaggle's image has pip; the install needs no ensurepip)."""
    import importlib.metadata

    try:
        importlib.metadata.version("kaggle-bridge")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    say(f"installing the bridge's dependencies into this Python (pip install {ROOT})")
    code = run_recorded(
        "pip install kaggle-bridge",
        [sys.executable, "-m", "pip", "install", "-q", str(ROOT)],
        log=log,
        children=children,
        cancel=cancel,
        timeout=900,
    )
    if code != 0:
        raise RuntimeError(f"pip install {ROOT} failed (exit {code}):\n{tail(log)}")


def host_of(url: str) -> str:
    """``host:port`` of a URL (masked in output when the URL is a secret)."""
    rest = url.split("://", 1)[-1]
    return rest.split("/", 1)[0]


def _http_url(relay: str) -> str:
    for a, b in (("wss://", "https://"), ("ws://", "http://")):
        if relay.startswith(a):
            return b + relay[len(a) :]
    return relay


def _read_or_make(path: Path, make: Callable[[], str]) -> str:
    """A secret kept in the state dir (mode 0600) so restarts keep it."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def _first_line(text: str, limit: int = 160) -> str:
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


# ---------------------------------------------------------------------------------------- deployment
@dataclass
class Facts:
    """What the status line and ``status.json`` show."""

    url: str = ""
    key_shown: str = ""
    url_shown: str = ""  # the URL as printed: a configured relay's URL is a secret
    model: str = ""
    mode: str = ""
    engine: str = ""
    webui: bool = False
    webui_error: str = ""  # why Open WebUI is not there ("" when it is, or was not asked for)
    placement: str = ""  # where the model runs: "GPU (CUDA ...)", "CPU: why", ...
    on_cpu: bool = False
    upstreams: list[str] = field(default_factory=list)
    local_endpoint: str = ""
    decision: str = ""
    handover: str = ""  # the next session: what happened
    timings: dict[str, float] = field(default_factory=dict)


class Deployment:
    """The whole stack. :meth:`run` blocks (a script); :meth:`start_background` returns once it is
    ready; :meth:`start_thread` returns at once (the notebook's live cell, deployment/notebook.py);
    :meth:`stop` drains and stops it, from any thread, during the bring-up too."""

    def __init__(self, settings: Settings, out: IO[str] | None = None) -> None:
        self.s = settings
        self.out = out or sys.stdout
        #: where progress bars draw: ``out``, or the notebook's live line
        self.progress_out: IO[str] = self.out
        self.redact = Redactor()
        self.redact.add(*settings.secrets())
        self.facts = Facts()
        self.key = ""  # the client key to show (a local relay's, generated here)
        self.node_token = settings.node_token
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.finished = threading.Event()
        self.cancel = threading.Event()  # set by stop(): helpers and downloads give up
        self.sup: Supervisor | None = None
        self.children = Children(settings.state_dir / "children.json")
        self.phase = "starting"
        self.stop_reason = ""
        self.reports: list[Path] = []  # validation reports written by this run
        self.ready_at = 0.0  # epoch seconds: READY, and the start of the drain
        self.draining_at = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._relay_nodes_before = 0
        self.gpus: list[gpumod.Gpu] = []
        kaggle = on_kaggle({**os.environ, "DEPLOY_KAGGLE_ROOT": str(settings.kaggle_root)})
        start, self.session_source = session_start(settings.session_start, container=kaggle)
        self.deadline = Deadline(
            start,
            settings.session_hours if settings.session_hours >= 0 else (12.0 if kaggle else 0.0),
            tuple(float(m) for m in settings.warn_minutes.split(",") if m.strip()),
            settings.drain_minutes,
        )
        self.kaggle = kaggle
        self.hours = GpuHours(
            Path(settings.gpu_hours_file)
            if settings.gpu_hours_file
            else settings.reports_dir / "gpu_hours.json",
            uuid.uuid4().hex[:12],
            self.deadline.start,
            [],
        )
        self.logs = settings.state_dir / "logs"
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        line = self.redact(f"[deploy {time.strftime('%H:%M:%S')}] {msg}")
        if not self.ready.is_set():
            self.phase = _first_line(self.redact(msg), 120)
        print(line, file=self.out, flush=True)
        with contextlib.suppress(OSError):
            self.logs.mkdir(parents=True, exist_ok=True)
            with open(self.logs / "deploy.log", "a") as f:
                f.write(line + "\n")

    def _mark(self, what: str) -> None:
        self.facts.timings[what] = round(time.monotonic() - self._t0, 2)

    # ------------------------------------------------------------------------------ entry points
    def run(self) -> int:
        """Run in this thread until SIGINT/SIGTERM or the session's end; 0 on a clean stop."""
        try:
            asyncio.run(self._main(signals=True))
        except Exception as exc:
            self.say(f"FAILED: {exc}")
            return 1
        return 0 if self.failed is None else 1

    def start_thread(self) -> Deployment:
        """Run the supervisor in a thread of its own (works under Jupyter's running loop, without
        nest_asyncio) and return at once; ``ready`` and ``finished`` tell how it goes."""
        self._thread = threading.Thread(target=self._thread_main, name="deploy-supervisor", daemon=True)
        self._thread.start()
        return self

    def start_background(self, timeout: float | None = None) -> Deployment:
        """:meth:`start_thread`, then wait until the stack is ready. Raises if it failed to come up;
        an interrupt or ``timeout`` stops it first."""
        self.start_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.ready.wait(0.2):
                if self.finished.is_set():
                    raise RuntimeError(f"the deployment failed: {self.failed}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("the deployment was not ready in time")
        except (KeyboardInterrupt, TimeoutError):  # the cell interrupted: take the half-started stack down
            self.stop()
            raise
        import atexit

        atexit.register(self.stop)
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main(signals=False))
        except BaseException as exc:
            self.failed = self.failed or exc
            self.say(f"FAILED: {exc}")
        finally:
            self.finished.set()

    def request_stop(self, why: str = "") -> None:
        """Ask for a drain and a stop (from any thread) without waiting."""
        self.stop_reason = self.stop_reason or why
        self.cancel.set()
        loop, ev = self._loop, self._stop
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def stop(self, timeout: float | None = None, why: str = "") -> None:
        """Drain the bridge and stop every child (from any thread); waits until done."""
        self.request_stop(why)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.s.drain_timeout + 60)

    def kill(self) -> None:
        """No drain: every recorded process now (a second interrupt)."""
        self.request_stop("killed")
        self.children.kill_all()

    # ------------------------------------------------------------------------------ the stack
    async def _main(self, *, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.cancel.is_set():  # stopped before the thread got here
            self._stop.set()
        if signals:
            self._install_signals()
        sup = self.sup = Supervisor(
            self.say,
            interval=self.s.health_interval,
            on_spawn=self.children.add,
            on_exit=self.children.remove,
        )
        try:
            self.s.state_dir.mkdir(parents=True, exist_ok=True)
            self.children.claim(self.say)
            bring_up = asyncio.create_task(self._bring_up(sup))
            stopped = asyncio.create_task(self._stop.wait())
            await asyncio.wait({bring_up, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if self._stop.is_set() or self.cancel.is_set():  # a stop asked for, whatever the bring-up did
                self.say("stopping during the bring-up: " + (self.stop_reason or "asked to"))
                self.cancel.set()
                bring_up.cancel()
                with contextlib.suppress(BaseException):  # cancelled, or given up on: we stop anyway
                    await bring_up
                return
            bring_up.result()  # raises what failed
            self._mark("ready")
            self.ready_at = time.time()
            if self.s.serve_minutes > 0:
                self.deadline.stop_at = time.time() + self.s.serve_minutes * 60
            self._banner()
            self.ready.set()
            watch = asyncio.create_task(sup.watch())
            try:
                await self._status_loop()
            finally:
                sup.request_stop()
                await watch
        except AlreadyRunning as exc:
            self.failed = exc
            raise
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError | Cancelled):
                self.failed = exc
            raise
        finally:
            self.cancel.set()
            if not isinstance(self.failed, AlreadyRunning):
                self.draining_at = time.time()
                self._write_status(state="draining")
                self.say("stopping: draining the bridge, then the rest")
                await sup.stop(first=["bridge"])
                self.children.kill_all()
                with contextlib.suppress(Exception):
                    self.hours.touch()
                self._write_status(state="stopped")
                self.say("stopped" + (f" ({self.stop_reason})" if self.stop_reason else ""))

    def _install_signals(self) -> None:
        assert self._loop is not None and self._stop is not None
        count = 0

        def on_signal() -> None:
            nonlocal count
            count += 1
            if count == 1:
                self.request_stop("signal")
            else:
                self.children.kill_all()
                os._exit(1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, on_signal)

    async def _bring_up(self, sup: Supervisor) -> None:
        s = self.s
        await asyncio.to_thread(
            ensure_bridge, self.say, log=self.logs / "install.log", children=self.children, cancel=self.cancel
        )
        self.gpus = await asyncio.to_thread(gpumod.query)
        self.hours.gpus = [g.name for g in self.gpus]
        mode = s.mode
        if mode == "auto":
            mode = "ollama" if self.gpus and not s.model_file else "embedded"
            self.say(
                f"mode auto: {mode} ({len(self.gpus)} GPU(s){', a model file given' if s.model_file else ''})"
            )
        self.facts.mode = mode
        self.say(
            f"state in {s.state_dir}; logs in {self.logs}; reports in {s.reports_dir}; "
            f"{gpumod.describe_vram(self.gpus)}; session ends {self._session_end_text()}"
        )

        # 1. the relay: ours (local), the configured one, or one deployed on Cloudflare
        relay_ws = await self._relay(sup)
        self._mark("relay")

        # 2. Open WebUI's install runs while the engine comes up (minutes on a fresh machine); the
        # API does not wait for it, and a failed install leaves the API up and says why
        want_webui = self._want_webui_hint()
        webui_exe_task = asyncio.create_task(self._webui_exe_safe(mode))

        # 3. the engine: Ollama servers or the embedded llama.cpp
        try:
            if mode == "ollama":
                route, urls = OLLAMA_ROUTE, await self._ollama(sup)
            else:
                route, urls = EMBEDDED_ROUTE, [await self._embedded(sup)]
        except BaseException:
            webui_exe_task.cancel()
            with contextlib.suppress(BaseException):
                await webui_exe_task
            raise
        self._mark("engine")
        self.facts.upstreams = urls

        # 4. the bridge, with its local endpoint for Open WebUI (whose route answers 502 until it is up)
        listen_port = s.listen_port or free_port()
        webui_port = (s.webui_port or free_port()) if want_webui else 0
        local = f"http://127.0.0.1:{listen_port}"
        self.facts.local_endpoint = local
        routes = [f"{route}={','.join(urls)}"]
        if route == EMBEDDED_ROUTE:  # Ollama's REST API, served by the bridge in front of the engine
            routes.append(f"{OLLAMA_ROUTE}=openai+{','.join(urls)}")
        if want_webui:
            routes.append(f"webui=http://127.0.0.1:{webui_port}")
        argv = [
            sys.executable,
            "-m",
            "bridge.cli",
            "connect",
            "--relay",
            relay_ws,
            "--listen",
            f"127.0.0.1:{listen_port}",
            "--default-route",
            route,
            "--metrics-dir",
            str(s.state_dir / "metrics"),
            "--gpu-mode",
            self.facts.mode,
            "--drain-timeout",
            str(s.drain_timeout),
            "--log-level",
            "info",
        ]
        for r in routes:
            argv += ["--route", r]
        if s.node_name:
            argv += ["--node-name", s.node_name]
        await sup.add(
            ChildSpec(
                "bridge",
                argv,
                _child_env(BRIDGE_NODE_TOKEN=self.node_token),
                self.logs / "bridge.log",
                health_url=local + "/_bridge/metrics",
                ready_timeout=60,
                stop_signal=signal.SIGTERM,
                stop_timeout=s.drain_timeout + 10,
                cwd=code_root(),
            )
        )
        await self._wait_node_connected()
        self._mark("bridge")

        # 5. Open WebUI, talking to the engine through the bridge's local endpoint
        if not webui_exe_task.done():
            self.say("the API is up (through the relay); Open WebUI is still installing")
        webui_exe = await webui_exe_task
        if webui_exe and want_webui:
            try:
                await self._webui(sup, webui_exe, webui_port, route, local)
                self._mark("webui")
            except Exception as exc:  # the API stays up without it
                self.facts.webui_error = _first_line(str(exc))
                self.say(f"Open WebUI FAILED: {exc}")
                with contextlib.suppress(KeyError):
                    child = sup.child("webui")
                    await child.stop()
                    sup.children.remove(child)

    def _session_end_text(self) -> str:
        if not self.deadline.hours:
            return "never (no session limit)"
        end = time.strftime("%H:%M:%S", time.localtime(self.deadline.session_end))
        return f"at {end} ({self.deadline.hours:g} h after {self.session_source})"

    async def _relay(self, sup: Supervisor) -> str:
        s = self.s
        if not s.relay and s.cloudflare != "off":
            await self._cloudflare_relay()
        if s.relay:
            if not self.node_token:
                raise RuntimeError(
                    "a relay is configured but no node token (BRIDGE_NODE_TOKEN: env or Kaggle Secret)"
                )
            self.facts.url = _http_url(s.relay).rstrip("/") + "/"
            self.redact.add(s.relay, self.facts.url.rstrip("/"), host_of(s.relay))
            self.facts.url_shown = "<your relay (BRIDGE_RELAY)>/"
            self.key = ""
            self.facts.key_shown = (
                f"your BRIDGE_KEY ({mask(s.key)})"
                if s.key
                else "a client key of the relay (`bridge keys add` on the relay)"
            )
            self.say("relay: the one in BRIDGE_RELAY (its URL is not shown: a secret)")
            return s.relay
        from bridge.relay.auth import new_key, new_token

        self.node_token = self.node_token or new_token()
        self.redact.add(self.node_token)
        key_file = s.state_dir / "relay-client-key"
        self.key = _read_or_make(key_file, lambda: new_key()[0])
        port = s.relay_port or free_port(s.relay_host)
        host = "127.0.0.1" if s.relay_host in ("0.0.0.0", "::", "") else s.relay_host
        url = f"http://{host}:{port}"
        default_route = (
            "webui"
            if self._want_webui_hint()
            else (OLLAMA_ROUTE if self.facts.mode == "ollama" else EMBEDDED_ROUTE)
        )
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
                _child_env(BRIDGE_NODE_TOKEN=self.node_token, BRIDGE_API_KEYS=self.key),
                self.logs / "relay.log",
                health_url=url + "/_relay/health",
                ready_timeout=60,
                cwd=code_root(),
            )
        )
        self.facts.url = self.facts.url_shown = url + "/"
        if self.kaggle:  # a saved notebook's output is public: the key stays in its file
            self.redact.add(self.key)
            self.facts.key_shown = f"{mask(self.key)} (in {key_file})"
        else:
            self.facts.key_shown = self.key
        self.say(
            f"relay: local, {url}/ (no BRIDGE_RELAY: "
            + ("only this notebook reaches it)" if self.kaggle else "set one to serve from elsewhere)")
        )
        return f"ws://{host}:{port}"

    async def _cloudflare_relay(self) -> None:
        """The hook for a relay on Cloudflare Workers (issue 19): with ``CLOUDFLARE_API_TOKEN`` and no
        ``BRIDGE_RELAY``, :data:`CLOUDFLARE_DEPLOY` deploys it and the bridge dials it."""
        s = self.s
        token = get_secret("CLOUDFLARE_API_TOKEN")
        if not token:
            if s.cloudflare == "on":
                raise RuntimeError("--cloudflare on: no CLOUDFLARE_API_TOKEN (env or Kaggle Secret)")
            return
        self.redact.add(token)
        if CLOUDFLARE_DEPLOY is None:
            if s.cloudflare == "on":
                raise RuntimeError("--cloudflare on: this version cannot deploy the Cloudflare relay")
            self.say(
                "CLOUDFLARE_API_TOKEN is set, but this version cannot deploy the Cloudflare relay yet: "
                "a local relay instead (set BRIDGE_RELAY to a relay you run)"
            )
            return
        self.say("relay: deploying the Cloudflare relay (CLOUDFLARE_API_TOKEN)")
        target = await asyncio.to_thread(
            CLOUDFLARE_DEPLOY, CloudflareRequest(token, self.s.state_dir / "cloudflare", self.say)
        )
        self.redact.add(target.url, target.node_token, target.key)
        s.relay, self.node_token = target.url, target.node_token
        s.key = s.key or target.key

    def _want_webui_hint(self) -> bool:
        if self.s.webui == "off":
            return False
        if self.s.webui == "on" or self.facts.mode == "ollama":
            return True
        return webui_setup.installed_version(self._webui_venv()) != ""

    def _webui_venv(self) -> Path:
        if self.s.webui_venv:
            return Path(self.s.webui_venv)
        repo = ROOT / ".venv-webui"
        return repo if repo.exists() else self.s.cache_dir / "venv-webui"

    async def _webui_exe_safe(self, mode: str) -> Path | None:
        """Open WebUI's executable, or None with the reason in ``facts.webui_error``."""
        try:
            return await asyncio.to_thread(self._webui_exe, mode)
        except (Cancelled, asyncio.CancelledError):
            raise
        except Exception as exc:
            self.facts.webui_error = _first_line(str(exc))
            self.say(
                f"Open WebUI FAILED to install: {exc}\n  the API keeps serving without it; "
                f"log: {self.logs / 'webui-install.log'}"
            )
            return None

    def _webui_exe(self, mode: str) -> Path | None:
        if self.s.webui == "off":
            return None
        install = self.s.webui == "on" or mode == "ollama"
        installer = webui_setup.Installer(
            self.s.cache_dir,
            self.logs / "webui-install.log",
            self.say,
            children=self.children,
            cancel=self.cancel,
        )
        exe = webui_setup.ensure(
            self._webui_venv(), self.say, version=self.s.webui_version, install=install, installer=installer
        )
        if exe is None:
            self.say(
                f"open-webui: not installed in {self._webui_venv()} (bash scripts/setup.d/20-open-webui.sh "
                "or --webui on): running without it"
            )
        return exe

    async def _embedded(self, sup: Supervisor) -> str:
        from deployment import engine as eng
        from deployment.engine_server import DIALOGUE_FORMAT

        why = eng.engine_available()
        if why:
            raise RuntimeError(f"the embedded engine cannot run: {why}")
        s = self.s
        choice = s.model_file or "auto"
        notice = ""
        if choice in ("auto", "gemma"):
            why = eng.gemma_available()
            if why and choice == "gemma":
                raise RuntimeError(f"--model-file gemma: {why}")
            if why:
                self.say(f"engine: Gemma is not installed ({why}): serving the generated tiny model")
                choice = "tiny"
            else:
                choice = "gemma"
        model_id = s.model or None
        chat_format = None if s.chat_format == "auto" else s.chat_format
        if choice == "gemma":
            model_file = await asyncio.to_thread(eng.gemma_model_file, s.cache_dir / "models")
            model_id = model_id or eng.GEMMA_MODEL_ID
            notice = eng.GEMMA_NOTICE
            if s.chat_format == "auto":
                chat_format = eng.GEMMA_CHAT_FORMAT
        elif choice == "tiny":
            model_file = s.state_dir / "models" / "tiny.gguf"
            if not model_file.exists():
                model_file.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(eng.make_tiny_model, model_file, seed=0)
                self.say(f"engine: wrote the tiny model {model_file}")
        else:
            model_file = Path(choice)
            if s.chat_format == "auto" and not await asyncio.to_thread(eng.has_chat_template, model_file):
                chat_format = DIALOGUE_FORMAT
        port = free_port()
        n_ctx = min(s.num_ctx, eng.TINY_CONTEXT) if choice == "tiny" else s.num_ctx
        engine = eng.EmbeddedEngine(
            model_file,
            port=port,
            n_ctx=n_ctx,
            model_id=model_id,
            log_path=self.logs / "engine.log",
            chat_format=chat_format,
            max_queue=s.engine_queue,
        )
        self.facts.model = engine.model
        self.facts.engine = "llama.cpp (llama-cpp-python), CPU"
        self.facts.placement = "CPU (the embedded engine)"
        await sup.add(
            ChildSpec(
                "engine",
                engine.command(),
                _child_env(OMP_NUM_THREADS=str(engine.n_threads)),
                self.logs / "engine.log",
                # answered without waiting for the model: 503 only when it holds a request and makes
                # no progress (deployment/engine_server.py); the supervisor tells busy from hung
                health_url=engine.health_url,
                ready_timeout=s.ready_timeout,
            )
        )
        self.say(
            f"engine: llama.cpp on {engine.url} serving {engine.model} ({model_file.name}"
            f"{', chat format ' + chat_format if chat_format else ''}; "
            f"queue bound {s.engine_queue or 'none'})" + (f"; {notice}" if notice else "")
        )
        return engine.url

    # ------------------------------------------------------------------------------ Ollama
    def ollama_env(
        self, port: int, models: Path, *, gpu: int | None = None, spread: bool = False
    ) -> dict[str, str]:
        """One Ollama server's settings. Flash attention on: it is what lets the KV cache be quantised,
        and saves memory at long contexts. KV cache q8_0 by default: half the memory of f16 for a
        quality loss too small to measure in chat; q4_0 only for very long contexts."""
        s = self.s
        env = _child_env(
            OLLAMA_HOST=f"127.0.0.1:{port}",
            OLLAMA_MODELS=str(models),
            OLLAMA_FLASH_ATTENTION="1" if s.flash_attention else "0",
            OLLAMA_KV_CACHE_TYPE=s.kv_cache_type if s.flash_attention else "f16",
            OLLAMA_CONTEXT_LENGTH=str(s.num_ctx),
            OLLAMA_NUM_PARALLEL=str(s.num_parallel),
            OLLAMA_KEEP_ALIVE="-1",
            OLLAMA_MAX_LOADED_MODELS="1",
        )
        if spread:
            env["OLLAMA_SCHED_SPREAD"] = "1"
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        return env

    async def _ollama(self, sup: Supervisor) -> list[str]:
        s = self.s
        model = s.model or DEFAULT_OLLAMA_MODEL
        self.facts.model = model
        exe = await asyncio.to_thread(
            ollama_setup.find_ollama,
            s.ollama,
            s.cache_dir,
            self.say,
            version=s.ollama_version,
            url=s.ollama_url,
            sha256=s.ollama_sha256,
            out=self.progress_out,
            cancel=self.cancel,
        )
        version = await asyncio.to_thread(ollama_setup.version_of, str(exe))
        self.facts.engine = f"Ollama {version}" if version else "Ollama"
        self.say(f"ollama: {exe} ({version or 'version unknown'})")
        self._mark("install")
        models = s.cache_dir / "ollama-models"
        models.mkdir(parents=True, exist_ok=True)

        # pull with a server of its own (no GPU work), then decide how to use the GPUs
        port = free_port()
        pull_url = f"http://127.0.0.1:{port}"
        puller = await sup.add(
            ChildSpec(
                "ollama-pull",
                [str(exe), "serve"],
                self.ollama_env(port, models),
                self.logs / "ollama-pull.log",
                health_url=pull_url + "/api/version",
                ready_timeout=120,
            )
        )
        try:
            size = await asyncio.to_thread(ollama_setup.has_model, pull_url, model)
            if size is None:
                self.say(f"pulling {model}")
                await asyncio.to_thread(
                    ollama_setup.pull, pull_url, model, self.say, self.progress_out, self.cancel
                )
                size = await asyncio.to_thread(ollama_setup.has_model, pull_url, model) or 0
            else:
                self.say(f"{model}: already pulled ({size / 1e9:.2f} GB)")
            self._mark("pull")
            shown = await asyncio.to_thread(ollama_setup.show, pull_url, model)
        finally:
            await puller.stop()
            sup.children.remove(puller)
        facts = gpumod.facts_from_show(model, size, shown) or gpumod.KNOWN_MODELS.get(model)
        if facts is None:
            facts = gpumod.ModelFacts(model, size, 1, 0, 0)  # unknown shape: weights only
        decision = gpumod.decide(
            s.gpu_mode,
            facts,
            self.gpus,
            num_ctx=s.num_ctx,
            num_parallel=s.num_parallel,
            kv_type=s.kv_cache_type if s.flash_attention else "f16",
        )
        self.facts.mode = decision.mode
        self.facts.decision = decision.reason
        self.say(f"gpu mode: {decision.reason}")

        # the servers: one per GPU (replicas) or one over all of them (split, single, cpu)
        base = s.ollama_port
        urls: list[str] = []
        names: list[str] = []
        for i in range(decision.replicas):
            port = base + i if base else free_port()
            url = f"http://127.0.0.1:{port}"
            if decision.mode == "replicas":
                env = self.ollama_env(port, models, gpu=self.gpus[i].index)
                name = f"ollama-gpu{self.gpus[i].index}"
            else:
                env = self.ollama_env(port, models, spread=decision.mode == "split")
                name = "ollama"
            await sup.add(
                ChildSpec(
                    name,
                    [str(exe), "serve"],
                    env,
                    self.logs / f"{name}.log",
                    health_url=url + "/api/version",
                    ready_timeout=120,
                    on_ready=self._warmer(url, model, name),
                )
            )
            urls.append(url)
            names.append(name)
        # warm every server at once: the first user request must not pay the load
        started = time.monotonic()
        took = await asyncio.gather(*(asyncio.to_thread(ollama_setup.warm, u, model) for u in urls))
        self.say(
            "warm: "
            + ", ".join(f"{u} {t:.1f} s" for u, t in zip(urls, took, strict=True))
            + f" (all {time.monotonic() - started:.1f} s); kept loaded (keep_alive -1)"
        )
        self._mark("warm")
        await asyncio.to_thread(self._check_placement, urls, names, model)
        return urls

    def _check_placement(self, urls: list[str], names: list[str], model: str) -> None:
        """After the warm-up: each server's ``/api/ps`` says whether the model sits in VRAM; when it
        does not, say so and why (the GPUs Ollama found, the driver, the CUDA library it picked)."""
        where: list[str] = []
        compute: list[str] = []
        cpu = False
        for url, name in zip(urls, names, strict=True):
            try:
                p = ollama_setup.placement(url, model)
            except httpx.HTTPError as exc:
                where.append(f"{name}: /api/ps failed ({exc})")
                continue
            with contextlib.suppress(OSError):
                log = (self.logs / f"{name}.log").read_text(errors="replace")
                compute.append(ollama_setup.describe_compute(ollama_setup.inference_compute(log)))
            if p is None:
                where.append(f"{name}: {model} not loaded")
                cpu = True
            elif not p.on_gpu:
                where.append(f"{name}: {p.where}")
                cpu = True
        libs = sorted({c for c in compute if c})
        if not cpu:
            self.facts.placement = "GPU" + (f" ({'; '.join(libs)})" if libs else "")
            self.say(
                f"placement: {model} is in VRAM on every server ({', '.join(libs) or 'library unknown'})"
            )
            return
        why = []
        if not self.gpus:
            why.append("no GPU visible (nvidia-smi/NVML found none: is the accelerator on?)")
        problem = gpumod.driver_problem(self.gpus)
        if problem:
            why.append(problem)
        if "cpu" in libs:
            why.append("Ollama's log: inference compute library=cpu (it found no usable GPU)")
        elif libs:
            why.append(f"Ollama uses {', '.join(libs)} but the model does not fit: see the gpu mode")
        self.facts.on_cpu = True
        self.facts.placement = "RUNNING ON CPU: " + "; ".join([*where, *why])
        self.say(
            f"WARNING: {model} is RUNNING ON CPU (slow): {'; '.join(where)}. Why: "
            + ("; ".join(why) or "unknown")
            + f". Logs: {self.logs}/ollama*.log; `python -m deployment doctor` checks the driver."
        )

    def _warmer(self, url: str, model: str, name: str) -> Callable[[], Any]:
        async def warm() -> None:
            took = await asyncio.to_thread(ollama_setup.warm, url, model)
            self.say(f"{name}: {model} loaded again in {took:.1f} s")

        return warm

    # ------------------------------------------------------------------------------ Open WebUI
    async def _webui(self, sup: Supervisor, exe: Path, port: int, route: str, local: str) -> None:
        s = self.s
        data = s.state_dir / "webui"
        data.mkdir(parents=True, exist_ok=True)
        secret_key = _read_or_make(s.state_dir / "webui-secret-key", lambda: secrets.token_urlsafe(48))
        password = s.webui_admin_password
        where = "your DEPLOY_WEBUI_ADMIN_PASSWORD"
        if not password:
            pw_file = s.state_dir / "webui-admin-password"
            password = _read_or_make(pw_file, lambda: secrets.token_urlsafe(18))
            where = f"the file {pw_file}"
        self.redact.add(secret_key, password)
        base = f"{local}/r/{route}"
        env = _child_env(
            **webui_setup.environment(
                data_dir=data,
                secret_key=secret_key,
                ollama_url=base if route == OLLAMA_ROUTE else "",
                openai_url=base + "/v1" if route != OLLAMA_ROUTE else "",
                admin_email=s.webui_admin_email,
                admin_password=password,
            )
        )
        url = f"http://127.0.0.1:{port}"
        await sup.add(
            ChildSpec(
                "webui",
                [str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
                env,
                self.logs / "webui.log",
                health_url=url + "/health",
                ready_timeout=s.ready_timeout,
                cwd=data,
            )
        )
        self.facts.webui = True
        self.say(f"open-webui: {url} -> {base} (admin {s.webui_admin_email}, password in {where})")

    # ------------------------------------------------------------------------------ status
    async def _relay_health(self, client: httpx.AsyncClient) -> dict[str, Any]:
        r = await client.get(self.facts.url + "_relay/health")
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    async def _wait_node_connected(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    health = await self._relay_health(client)
                    if health.get("node_connected"):
                        return
                await asyncio.sleep(0.2)
        self.say(
            f"WARNING: the relay does not list this bridge after {timeout:.0f} s "
            f"(see {self.logs / 'bridge.log'})"
        )

    def _vram(self) -> str:
        return gpumod.describe_vram(self.gpus)

    def _webui_text(self) -> str:
        if self.facts.webui:
            return "Open WebUI on"
        if self.facts.webui_error:
            return f"Open WebUI FAILED: {self.facts.webui_error}"
        return "Open WebUI off"

    def status_line(self) -> str:
        f = self.facts
        left = Deadline.fmt(self.deadline.left()) if self.deadline.limited else "no limit"
        label = "session left" if self.deadline.ends_with_session or not self.deadline.limited else "run left"
        return (
            f"open {f.url_shown} | key {f.key_shown} | model {f.model} | mode {f.mode}"
            f"{' x' + str(len(f.upstreams)) if len(f.upstreams) > 1 else ''} ({f.engine}) | "
            f"{f.placement or 'placement unknown'} | {self._webui_text()} | "
            f"VRAM {self._vram()} | {label} {left}" + (f" | next session: {f.handover}" if f.handover else "")
        )

    def live_line(self) -> str:
        """The one line a notebook shows and updates in place: the bring-up's step, then the status,
        then how it ended."""
        if self.finished.is_set():
            state = "FAILED: " + _first_line(str(self.failed)) if self.failed else "stopped"
            why = f" ({self.stop_reason})" if self.stop_reason and not self.failed else ""
            return self.redact(f"{state}{why} | {self.status_line() if self.ready.is_set() else self.phase}")
        if not self.ready.is_set():
            return self.redact(f"starting ({time.monotonic() - self._t0:.0f} s): {self.phase}")
        prefix = "DRAINING" if self.stop_reason else "SERVING"
        return self.redact(f"{prefix} {time.strftime('%H:%M:%S')} | {self.status_line()}")

    def _banner(self) -> None:
        f = self.facts
        u = f.url_shown
        api = f"{u}r/{OLLAMA_ROUTE}/api/chat (Ollama API), {u}r/{OLLAMA_ROUTE}/v1 (OpenAI API)"
        self._write_status(state="ready")  # before READY: whoever reads the line finds the file
        self.say(f"READY in {self.facts.timings.get('ready', 0):.1f} s: " + self.status_line())
        self.say(
            f"  browser: {u}{'' if f.webui else ' (no Open WebUI: the API only)'}"
            f"{' (log in with the key, then Open WebUI)' if f.webui else ''}"
        )
        self.say(f"  API:     {api} with 'Authorization: Bearer <key>'")
        self.say(f"  timings: {json.dumps(self.facts.timings)}")
        if self.deadline.limited:
            end = time.strftime("%H:%M:%S", time.localtime(self.deadline.end))
            why = "--serve-minutes" if not self.deadline.ends_with_session else "the session's end"
            self.say(f"  serving until {end} ({why}), draining {self.s.drain_minutes:g} min before")
        if self._export_env():
            exported = self.validate_env()
            if os.environ.get("BRIDGE_RELAY"):  # the user's own setting: `bridge validate` reads it too
                del exported["BRIDGE_RELAY"]
            else:  # ours: a later run in this kernel must not take it for the user's (parse_settings)
                os.environ[EXPORTED_RELAY] = exported["BRIDGE_RELAY"]
            os.environ.update(exported)

    def _route_name(self) -> str:
        return OLLAMA_ROUTE if self.facts.engine.startswith("Ollama") else EMBEDDED_ROUTE

    def validate_env(self) -> dict[str, str]:
        """What `bridge validate` reads, for this deployment (the key only when we know it)."""
        route = self._route_name()
        env = {
            "BRIDGE_RELAY": self.facts.url.rstrip("/"),
            "BRIDGE_MODEL": self.facts.model,
            "BRIDGE_VALIDATE_ROUTE": route,
            "BRIDGE_API": "ollama" if route == OLLAMA_ROUTE else "openai",
            "BRIDGE_GPU_MODE": self.facts.mode,
            "BRIDGE_METRICS_DIR": str(self.s.state_dir / "metrics"),
        }
        key = self.key or self.s.key
        if key:
            env["BRIDGE_KEY"] = key
        return env

    def _export_env(self) -> bool:
        return in_notebook() if self.s.export_env == "auto" else _truthy(self.s.export_env)

    def _write_status(self, state: str) -> None:
        data = {
            "state": state,
            "pid": os.getpid(),
            "time": time.time(),
            "url": self.facts.url_shown,
            "model": self.facts.model,
            "mode": self.facts.mode,
            "engine": self.facts.engine,
            "decision": self.facts.decision,
            "placement": self.facts.placement,
            "upstreams": self.facts.upstreams,
            "local_endpoint": self.facts.local_endpoint,
            "webui": self.facts.webui,
            "webui_error": self.facts.webui_error,
            "handover": self.facts.handover,
            "timings": self.facts.timings,
            "session_start": self.deadline.start,
            "session_start_from": self.session_source,
            "session_end": self.deadline.session_end if self.deadline.hours else None,
            "run_end": self.deadline.end if self.deadline.limited else None,
            "stop_reason": self.stop_reason,
            "ready_at": self.ready_at,
            "draining_at": self.draining_at,
            "children": {
                c.spec.name: {
                    "pid": c.pid,
                    "restarts": c.restarts,
                    "healthy": c.healthy,
                    "state": c.state,
                    "exe": os.path.basename(c.spec.argv[0]),
                }
                for c in (self.sup.children if self.sup else [])
            },
            "validate_env": {k: v for k, v in self.validate_env().items() if k != "BRIDGE_KEY"},
        }
        with contextlib.suppress(OSError):
            path = self.s.state_dir / "status.json"
            tmp = path.with_name("status.json.tmp")
            tmp.write_text(self.redact(json.dumps(data, indent=1)))
            tmp.replace(path)

    async def _status_loop(self) -> None:
        """Every few seconds until the end: status.json, the deadline's warnings, the next session,
        a stop asked for from outside (``python -m deployment stop``), the validation run."""
        assert self._stop is not None
        last_status = time.monotonic()
        last_touch = 0.0
        summary: dict[str, Any] = {}
        handing_over: asyncio.Task[bool] | None = None
        validating = asyncio.create_task(self._validate()) if self.s.validate else None
        stop_file = self.s.state_dir / "stop-request"
        stop_file.unlink(missing_ok=True)
        try:
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), min(self.s.health_interval, 5.0))
                if self._stop.is_set():
                    return
                if stop_file.exists():
                    stop_file.unlink(missing_ok=True)
                    self.stop_reason = self.stop_reason or "python -m deployment stop"
                    return
                self.gpus = await asyncio.to_thread(gpumod.query) if self.gpus else []
                if time.monotonic() - last_touch >= 60 or not summary:
                    last_touch = time.monotonic()
                    summary = await asyncio.to_thread(self.hours.touch)
                self._write_status(state="ready")
                if self.deadline.due_warnings():  # several at once (a short run): one message
                    why = "the session's end" if self.deadline.ends_with_session else "--serve-minutes"
                    self.say(
                        f"WARNING: this run ends in {Deadline.fmt(self.deadline.left())} ({why}); the "
                        f"bridge drains {self.s.drain_minutes:g} min before. "
                        f"GPU hours (7 days): {summary['session_hours_7d']}"
                    )
                    if handing_over is None and self.deadline.ends_with_session and self._wants_handover():
                        handing_over = asyncio.create_task(self._hand_over())
                if handing_over is not None and handing_over.done() and self._handed_over(handing_over):
                    self.stop_reason = "handed over to the next session"
                    return
                if self.deadline.must_drain():
                    if handing_over is not None:
                        if not handing_over.done():
                            handing_over.cancel()
                        self.facts.handover = self.facts.handover or "did not connect"
                        self.say(
                            "the next session's bridge has not connected to the relay: this session "
                            "served to its end"
                        )
                    self.stop_reason = (
                        "the session's end" if self.deadline.ends_with_session else "--serve-minutes"
                    )
                    self.say(
                        f"{self.stop_reason}: draining the bridge so the relay holds new requests "
                        "for the next bridge"
                    )
                    return
                if time.monotonic() - last_status >= self.s.status_interval:
                    last_status = time.monotonic()
                    self.say(f"status: {self.status_line()} | GPU hours 7d {summary['session_hours_7d']}")
        finally:
            for task in (handing_over, validating):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task

    # ------------------------------------------------------------------------------ next session
    def _handed_over(self, task: asyncio.Task[bool]) -> bool:
        if task.cancelled():
            return False
        exc = task.exception()
        if exc is not None:  # a bug or an odd answer: this session serves on
            self.facts.handover = f"FAILED: {_first_line(str(exc))}"
            self.say(f"next session: FAILED: {exc!r}; this session serves to its end")
            return False
        return task.result()

    def _wants_handover(self) -> bool:
        return bool(self.s.next_kernel or self.s.next_session_cmd)

    async def _hand_over(self) -> bool:
        """Start the next session (push the notebook, or DEPLOY_NEXT_SESSION_CMD), then wait for its
        bridge on the relay. True once it is connected: time to drain."""
        s = self.s
        if not s.relay:
            self.facts.handover = "needs BRIDGE_RELAY"
            self.say(
                "next session: not started: a local relay ends with this session (set BRIDGE_RELAY to a "
                "relay you run)"
            )
            return False
        async with httpx.AsyncClient(timeout=15) as client:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                self._relay_nodes_before = int((await self._relay_health(client)).get("nodes", 1))
            if s.next_session_cmd:
                ok, why = await self._next_session_cmd()
            else:
                self.say(f"next session: pushing {s.next_kernel} with the Kaggle CLI ({s.next_accelerator})")
                result = await asyncio.to_thread(
                    handover.push_next_session,
                    s.next_kernel,
                    s.state_dir,
                    self.say,
                    self.redact,
                    accelerator=s.next_accelerator,
                    children=self.children,
                    cancel=self.cancel,
                )
                ok, why = result.ok, result.reason
            if not ok:
                self.facts.handover = f"FAILED: {why}"
                self.say(f"next session: FAILED: {why}; this session serves to its end")
                return False
            self.facts.handover = "started, waiting for its bridge"
            self.say(f"next session: {why}; waiting for its bridge on the relay, then this one drains")
            while True:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    nodes = int((await self._relay_health(client)).get("nodes", 0))
                    if nodes > self._relay_nodes_before:
                        self.facts.handover = "connected"
                        self.say(
                            f"next session: its bridge is connected ({nodes} bridges on the relay): "
                            "draining this one"
                        )
                        return True
                await asyncio.sleep(5 if self.s.health_interval >= 5 else 0.5)

    async def _next_session_cmd(self) -> tuple[bool, str]:
        log = self.logs / "next-session.log"
        code = await asyncio.to_thread(
            run_recorded,
            "next-session",
            ["/bin/sh", "-c", self.s.next_session_cmd],
            log=log,
            children=self.children,
            cancel=self.cancel,
            timeout=600,
        )
        for line in tail(log, 12).splitlines()[1:]:
            self.say(f"next-session command: {line}")
        self.say(f"next-session command exited {code}")
        return code == 0, f"DEPLOY_NEXT_SESSION_CMD exited {code}"

    # ------------------------------------------------------------------------------ validation
    async def _validate(self) -> None:
        """`bridge validate` through the relay, while serving; the report goes to the reports dir."""
        try:
            await self._run_validation()
        except (asyncio.CancelledError, Cancelled):
            raise
        except Exception as exc:  # the service goes on
            self.say(f"validation: FAILED: {exc!r}")

    async def _run_validation(self) -> None:
        env = self.validate_env()
        if "BRIDGE_KEY" not in env:
            self.say("validation: skipped: it needs a client key of the relay (BRIDGE_KEY)")
            return
        out = self.s.reports_dir / f"validation-{time.strftime('%Y%m%d-%H%M%S')}"
        argv = [
            sys.executable,
            "-m",
            "bridge.cli",
            "validate",
            "--out",
            str(out),
            *self.s.validate_args.split(),
        ]
        self.say(f"validation: running `bridge validate` through the relay into {out}")
        log = self.logs / "validate.log"
        code = await asyncio.to_thread(
            run_recorded,
            "validate",
            argv,
            log=log,
            children=self.children,
            cancel=self.cancel,
            env=_child_env(**env),
            cwd=code_root(),
        )
        for line in tail(log, 4).splitlines():
            if line.startswith(("validation ", "report:")):
                self.say(line)
        if (out / "report.md").exists():
            self.reports.append(out)
        self.say(f"validation: {'done' if code == 0 else f'FAILED (exit {code}), log {log}'}")


# ---------------------------------------------------------------------------------------- commands
#: The deployment running in this process (a notebook kernel), for `status` and `stop`.
RUNNING: Deployment | None = None


def _status_command(settings: Settings) -> int:
    if RUNNING is not None:
        print(RUNNING.redact(RUNNING.status_line()))
        return 0
    path = settings.state_dir / "status.json"
    if not path.exists():
        print(f"no deployment: {path} does not exist")
        return 1
    print(path.read_text())
    return 0


def _stop_command(settings: Settings, wait: float = 120.0) -> int:
    """Ask the deployment in ``--state-dir`` to drain and stop (it checks every few seconds), and
    wait until it has: works whether it runs as a script or inside a notebook's kernel."""
    global RUNNING
    if RUNNING is not None:
        RUNNING.stop()
        RUNNING = None
        return 0
    path = settings.state_dir / "status.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    if data.get("state") != "ready":
        print("no running deployment")
        return 1
    (settings.state_dir / "stop-request").touch()
    print(f"asked the deployment (pid {data.get('pid')}) to drain and stop")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("state") == "stopped":
                print("stopped")
                return 0
        time.sleep(0.5)
    print(f"it has not stopped after {wait:.0f} s")
    return 1


def show_report(folder: Path) -> int:
    """Show a `bridge validate` report: Markdown and plots in a notebook, the text in a terminal."""
    report = folder / "report.md"
    if not report.exists():
        print(f"no report at {report}")
        return 1
    redact = RUNNING.redact if RUNNING is not None else Redactor()  # a configured relay's URL is a secret
    text = redact(report.read_text())
    if in_notebook():
        with contextlib.suppress(ImportError):
            ipd: Any = importlib.import_module("IPython.display")
            ipd.display(ipd.Markdown(text))
            for png in sorted(folder.glob("*.png")):
                ipd.display(ipd.Image(filename=str(png)))
            return 0
    print(text)
    return 0


COMMANDS = ("up", "status", "stop", "report", "doctor")


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m deployment``). In a notebook use deployment.notebook.serve();
    here, under a running event loop, ``up`` returns once the stack is ready (it keeps running in a
    thread: ``stop`` or the process's end stops it)."""
    global RUNNING
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "up"
    if command == "report":
        return show_report(Path(argv[0] if argv else "validation"))
    if command == "doctor":
        from deployment.doctor import main as doctor_main

        return doctor_main(argv)
    settings = parse_settings(argv)
    if command == "status":
        return _status_command(settings)
    if command == "stop":
        return _stop_command(settings)
    if RUNNING is not None and not RUNNING.finished.is_set():
        print("already running in this process: " + RUNNING.redact(RUNNING.status_line()))
        return 0
    dep = Deployment(settings)
    background = in_notebook() if settings.background == "auto" else _truthy(settings.background)
    if background:
        RUNNING = dep
        dep.start_background()
        return 0
    return dep.run()


if __name__ == "__main__":
    raise SystemExit(main())
