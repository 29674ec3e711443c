#!/usr/bin/env python3
"""Kaggle deployment: Ollama (or the embedded llama.cpp engine) + Open WebUI + the bridge, supervised.

One command takes a fresh Kaggle GPU notebook (2x T4, 12 h session, internet on) to a private
service reachable through the relay; where Ollama cannot run (no GPU, no internet: CI, a laptop) the
same script runs the whole stack on an embedded engine (llama.cpp via ``deployment/engine.py``, on a
tiny generated model or ``--model-file``), with a local relay when none is configured::

    python deployment/kaggle_ollama_webui.py                    # auto: Ollama with a GPU, else embedded
    python deployment/kaggle_ollama_webui.py --mode embedded    # what scripts/run.sh runs
    %run deployment/kaggle_ollama_webui.py --mode ollama        # in a notebook: returns when ready

Every flag is also an environment variable (``--help`` shows which): ``BRIDGE_*`` for what the
bridge shares with its other commands (relay URL, node token, client key), ``DEPLOY_*`` for the
rest. Secrets (``BRIDGE_NODE_TOKEN``, ``BRIDGE_KEY``, ``DEPLOY_WEBUI_ADMIN_PASSWORD``, and
``BRIDGE_RELAY``) come from the environment or Kaggle Secrets, never from the notebook's text, and
are never printed. See deployment/README.md for the choices (GPU modes, flash attention, KV cache).

The children (local relay, engine or Ollama servers, bridge, Open WebUI) run under an asyncio
supervisor: each is started when the previous one is healthy, health-checked every few seconds, and
restarted with exponential backoff when it exits or stops answering. In a notebook (a running event
loop in the main thread) the supervisor runs in a thread of its own and the cell returns once the
stack is ready; as a script it runs in the main thread until SIGINT/SIGTERM. On the way out, and 5
minutes before the session's 12 h end, the bridge drains (the relay then holds new requests for the
next session's bridge).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
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

# Run as a file (python path/to/kaggle_ollama_webui.py, or IPython's %run, which sets no
# __package__ at all): put the repository on sys.path, and not deployment/ itself.
if not globals().get("__package__"):
    _ROOT = Path(__file__).resolve().parent.parent
    _HERE = str(_ROOT / "deployment")
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))

import httpx

from deployment import gpus as gpumod
from deployment import ollama_setup, webui_setup
from deployment.engine import free_port
from deployment.session import Deadline, GpuHours, Redactor, get_secret, mask, session_start
from deployment.supervisor import ChildSpec, Supervisor

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_ROUTE = "engine"
OLLAMA_ROUTE = "ollama"
DEFAULT_OLLAMA_MODEL = "qwen3:8b"


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
    state_dir: Path = Path()
    cache_dir: Path = Path()
    model: str = ""
    model_file: str = ""
    gpu_mode: str = "auto"
    num_ctx: int = 8192
    num_parallel: int = 2
    kv_cache_type: str = "q8_0"
    flash_attention: bool = True
    ollama: str = ""
    ollama_version: str = ollama_setup.OLLAMA_VERSION
    ollama_url: str = ""
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
    warn_minutes: str = "60,30,10"
    drain_minutes: float = 5.0
    drain_timeout: float = 30.0
    next_session_cmd: str = ""
    gpu_hours_file: str = ""
    status_interval: float = 600.0
    health_interval: float = 5.0
    ready_timeout: float = 300.0
    export_env: str = "auto"
    background: str = "auto"

    def secrets(self) -> list[str]:
        return [self.node_token, self.key, self.webui_admin_password]


def _default_state_dir() -> Path:
    kaggle = Path("/kaggle/working")
    return kaggle / "deploy" if on_kaggle() else ROOT / ".data" / "deploy"


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
    "state_dir": ("DEPLOY_STATE_DIR", "logs, relay data, Open WebUI's database, status.json"),
    "cache_dir": ("DEPLOY_CACHE_DIR", "downloads, the Ollama install and models (default: <state>/cache)"),
    "model": (
        "DEPLOY_MODEL",
        f"model to serve (Ollama: default {DEFAULT_OLLAMA_MODEL}; embedded: the file's)",
    ),
    "model_file": ("DEPLOY_MODEL_FILE", "embedded: a GGUF file (default: a tiny generated model)"),
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
    "session_start": ("DEPLOY_SESSION_START", "session start, epoch seconds (default: this process's start)"),
    "warn_minutes": ("DEPLOY_WARN_MINUTES", "warn this many minutes before the end (comma-separated)"),
    "drain_minutes": ("DEPLOY_DRAIN_MINUTES", "drain the bridge this many minutes before the end"),
    "drain_timeout": (
        "BRIDGE_DRAIN_TIMEOUT",
        "seconds the bridge lets requests in flight finish when stopping",
    ),
    "next_session_cmd": (
        "DEPLOY_NEXT_SESSION_CMD",
        "shell command run at the first warning (e.g. kaggle kernels push)",
    ),
    "gpu_hours_file": ("DEPLOY_GPU_HOURS_FILE", "JSON record of sessions (default: <state>/gpu_hours.json)"),
    "status_interval": ("DEPLOY_STATUS_INTERVAL", "seconds between status lines"),
    "health_interval": ("DEPLOY_HEALTH_INTERVAL", "seconds between health checks"),
    "ready_timeout": ("DEPLOY_READY_TIMEOUT", "seconds a child may take to become healthy"),
    "export_env": (
        "DEPLOY_EXPORT_ENV",
        "on/off/auto: set BRIDGE_RELAY_URL, BRIDGE_KEY, ... for `bridge validate`",
    ),
    "background": ("DEPLOY_BACKGROUND", "on/off/auto: run the supervisor in a thread and return when ready"),
}


def _truthy(value: str | bool) -> bool:
    return value if isinstance(value, bool) else value.strip().lower() in ("1", "true", "yes", "on")


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = dict(os.environ if env is None else env)
    ap = argparse.ArgumentParser(
        prog="kaggle_ollama_webui.py",
        description=(__doc__ or "").split("\n\n")[0],
        epilog="Commands besides running the stack: `status`, `stop` (the deployment of this kernel or "
        "state dir) and `report DIR` (show a `bridge validate` report).",
    )
    defaults = Settings()
    for f in fields(Settings):
        var, text = _FLAGS[f.name]
        flag = "--" + f.name.replace("_", "-")
        default: Any = getattr(defaults, f.name)
        if f.name == "state_dir":
            default = _default_state_dir()
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
        shown = "(secret)" if f.name in ("node_token", "key", "webui_admin_password") else value
        if f.name == "cache_dir" and value == Path():
            shown = "<state>/cache"
        ap.add_argument(
            flag, dest=f.name, type=kind, default=value, help=f"{text} [env {var}; default {shown}]"
        )
    return ap


def parse_settings(argv: list[str] | None = None, env: dict[str, str] | None = None) -> Settings:
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
    if s.cache_dir == Path():
        s.cache_dir = s.state_dir / "cache"
    for choice, allowed in (
        (s.mode, ("auto", "ollama", "embedded")),
        (s.gpu_mode, ("auto", "split", "replicas")),
        (s.kv_cache_type, tuple(gpumod.KV_BYTES)),
        (s.webui, ("auto", "on", "off")),
    ):
        if choice not in allowed:
            raise SystemExit(f"error: {choice!r}: expected one of {', '.join(allowed)}")
    return s


def on_kaggle() -> bool:
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or Path("/kaggle/working").is_dir()


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
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH", "")])])
    env.update(extra)
    return env


def ensure_bridge(say: Callable[[str], None]) -> None:
    """The bridge (its dependencies and the ``bridge`` command) in this interpreter: on a fresh
    Kaggle kernel ``pip install`` of this repository, once."""
    import importlib.metadata
    import subprocess

    try:
        importlib.metadata.version("kaggle-bridge")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    say(f"installing the bridge into this Python (pip install {ROOT})")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", str(ROOT)], check=True)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    upstreams: list[str] = field(default_factory=list)
    local_endpoint: str = ""
    decision: str = ""
    timings: dict[str, float] = field(default_factory=dict)


class Deployment:
    """The whole stack. :meth:`run` blocks (a script); :meth:`start_background` returns once it is
    ready (a notebook); :meth:`stop` drains and stops it."""

    def __init__(self, settings: Settings, out: IO[str] | None = None) -> None:
        self.s = settings
        self.out = out or sys.stdout
        self.redact = Redactor()
        self.redact.add(*settings.secrets())
        self.facts = Facts()
        self.key = ""  # the client key to show (a local relay's, generated here)
        self.node_token = settings.node_token
        self.ready = threading.Event()
        self.failed: BaseException | None = None
        self.finished = threading.Event()
        self.sup: Supervisor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self.gpus: list[gpumod.Gpu] = []
        self.deadline = Deadline(
            session_start(settings.session_start),
            settings.session_hours if settings.session_hours >= 0 else (12.0 if on_kaggle() else 0.0),
            tuple(float(m) for m in settings.warn_minutes.split(",") if m.strip()),
            settings.drain_minutes,
        )
        self.hours = GpuHours(
            Path(settings.gpu_hours_file)
            if settings.gpu_hours_file
            else settings.state_dir / "gpu_hours.json",
            uuid.uuid4().hex[:12],
            self.deadline.start,
            [],
        )
        self.logs = settings.state_dir / "logs"
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------------------ output
    def say(self, msg: str) -> None:
        line = self.redact(f"[deploy {time.strftime('%H:%M:%S')}] {msg}")
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
        return 0

    def start_background(self, timeout: float | None = None) -> Deployment:
        """Run the supervisor in a thread of its own (works under Jupyter's running loop, without
        nest_asyncio); return once the stack is ready. Raises if it failed to come up."""
        self._thread = threading.Thread(target=self._thread_main, name="deploy-supervisor", daemon=True)
        self._thread.start()
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
            self.failed = exc
            self.say(f"FAILED: {exc}")

    def stop(self, timeout: float | None = None) -> None:
        """Drain the bridge and stop every child (from any thread)."""
        loop, ev = self._loop, self._stop
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.s.drain_timeout + 60)

    # ------------------------------------------------------------------------------ the stack
    async def _main(self, *, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if signals:
            self._install_signals()
        sup = self.sup = Supervisor(self.say, interval=self.s.health_interval)
        try:
            await self._bring_up(sup)
            self._mark("ready")
            self._banner()
            self.ready.set()
            watch = asyncio.create_task(sup.watch())
            try:
                await self._status_loop()
            finally:
                sup.request_stop()
                await watch
        finally:
            self.say("stopping: draining the bridge, then the rest")
            await sup.stop(first=["bridge"])
            with contextlib.suppress(Exception):
                self.hours.touch()
            self._write_status(state="stopped")
            self.say("stopped")
            self.finished.set()

    def _reap_orphans(self) -> None:
        """Children a previous run in this state dir left behind (its process was killed, e.g. a
        notebook kernel restarted): they would hold the ports. Killed only when that run's process is
        gone and the pid still runs the same executable."""
        try:
            old = json.loads((self.s.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return
        if old.get("state") == "stopped" or _pid_alive(int(old.get("pid", 0))):
            return
        for name, child in old.get("children", {}).items():
            pid, exe = int(child.get("pid") or 0), str(child.get("exe", ""))
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2]
            except OSError:
                continue
            # argv[0], or argv[1] for a script run by its interpreter (#!)
            if pid and exe and exe in {os.path.basename(a.decode(errors="replace")) for a in args}:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
                    self.say(f"stopped {name} (pid {pid}), left running by a previous run that died")

    def _install_signals(self) -> None:
        assert self._loop is not None and self._stop is not None
        stop = self._stop
        count = 0

        def on_signal() -> None:
            nonlocal count
            count += 1
            if count == 1:
                stop.set()
            else:
                os._exit(1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, on_signal)

    async def _bring_up(self, sup: Supervisor) -> None:
        s = self.s
        s.state_dir.mkdir(parents=True, exist_ok=True)
        self._reap_orphans()
        await asyncio.to_thread(ensure_bridge, self.say)
        self.gpus = await asyncio.to_thread(gpumod.query)
        self.hours.gpus = [g.name for g in self.gpus]
        mode = s.mode
        if mode == "auto":
            mode = "ollama" if self.gpus and not s.model_file else "embedded"
            self.say(
                f"mode auto: {mode} ({len(self.gpus)} GPU(s){', a model file given' if s.model_file else ''})"
            )
        self.facts.mode = mode
        self.say(f"state in {s.state_dir}; logs in {self.logs}; {gpumod.describe_vram(self.gpus)}")

        # 1. the relay: ours (local) or the configured one
        relay_ws = await self._relay(sup)
        self._mark("relay")

        # 2. Open WebUI's install may run while the engine comes up (minutes on a fresh machine)
        webui_exe_task = asyncio.create_task(asyncio.to_thread(self._webui_exe, mode))

        # 3. the engine: Ollama servers or the embedded llama.cpp
        if mode == "ollama":
            route, urls = OLLAMA_ROUTE, await self._ollama(sup)
        else:
            route, urls = EMBEDDED_ROUTE, [await self._embedded(sup)]
        self._mark("engine")
        self.facts.upstreams = urls
        webui_exe = await webui_exe_task

        # 4. the bridge, with its local endpoint for Open WebUI
        listen_port = s.listen_port or free_port()
        webui_port = (s.webui_port or free_port()) if webui_exe else 0
        local = f"http://127.0.0.1:{listen_port}"
        self.facts.local_endpoint = local
        routes = [f"{route}={','.join(urls)}"]
        if webui_exe:
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
                cwd=ROOT,
            )
        )
        await self._wait_node_connected()
        self._mark("bridge")

        # 5. Open WebUI, talking to the engine through the bridge's local endpoint
        if webui_exe:
            await self._webui(sup, webui_exe, webui_port, route, local)
            self._mark("webui")

    async def _relay(self, sup: Supervisor) -> str:
        s = self.s
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
        self.key = _read_or_make(s.state_dir / "relay-client-key", lambda: new_key()[0])
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
                cwd=ROOT,
            )
        )
        self.facts.url = self.facts.url_shown = url + "/"
        self.facts.key_shown = self.key
        self.say(f"relay: local, {url}/ (no relay configured: BRIDGE_RELAY)")
        return f"ws://{host}:{port}"

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

    def _webui_exe(self, mode: str) -> Path | None:
        if self.s.webui == "off":
            return None
        install = self.s.webui == "on" or mode == "ollama"
        exe = webui_setup.ensure(self._webui_venv(), self.say, version=self.s.webui_version, install=install)
        if exe is None:
            self.say(
                f"open-webui: not installed in {self._webui_venv()} (bash scripts/setup.d/20-open-webui.sh "
                "or --webui on): running without it"
            )
        return exe

    async def _embedded(self, sup: Supervisor) -> str:
        from deployment.engine import EmbeddedEngine, engine_available, make_tiny_model

        why = engine_available()
        if why:
            raise RuntimeError(f"the embedded engine cannot run: {why}")
        s = self.s
        if s.model_file:
            model_file = Path(s.model_file)
        else:
            model_file = s.state_dir / "models" / "tiny.gguf"
            if not model_file.exists():
                model_file.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(make_tiny_model, model_file, seed=0)
                self.say(f"engine: wrote the tiny model {model_file}")
        port = free_port()
        n_ctx = min(s.num_ctx, 4096) if not s.model_file else s.num_ctx
        engine = EmbeddedEngine(
            model_file, port=port, n_ctx=n_ctx, model_id=s.model or None, log_path=self.logs / "engine.log"
        )
        self.facts.model = engine.model
        self.facts.engine = "llama.cpp (llama-cpp-python), CPU"
        await sup.add(
            ChildSpec(
                "engine",
                engine.command(),
                _child_env(OMP_NUM_THREADS=str(engine.n_threads)),
                self.logs / "engine.log",
                health_url=engine.openai_url + "/models",
                ready_timeout=s.ready_timeout,
            )
        )
        self.say(f"engine: llama.cpp on {engine.url} serving {engine.model} ({model_file.name})")
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
            out=self.out,
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
                await asyncio.to_thread(ollama_setup.pull, pull_url, model, self.say, self.out)
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
        # warm every server at once: the first user request must not pay the load
        started = time.monotonic()
        took = await asyncio.gather(*(asyncio.to_thread(ollama_setup.warm, u, model) for u in urls))
        self.say(
            "warm: "
            + ", ".join(f"{u} {t:.1f} s" for u, t in zip(urls, took, strict=True))
            + f" (all {time.monotonic() - started:.1f} s); kept loaded (keep_alive -1)"
        )
        self._mark("warm")
        return urls

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
    async def _wait_node_connected(self, timeout: float = 30.0) -> None:
        url = self.facts.url + "_relay/health"
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(trust_env=False, timeout=10) as client:
            while time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await client.get(url)
                    if r.status_code == 200 and r.json().get("node_connected"):
                        return
                await asyncio.sleep(0.2)
        self.say(
            f"WARNING: the relay does not list this bridge after {timeout:.0f} s "
            f"(see {self.logs / 'bridge.log'})"
        )

    def _vram(self) -> str:
        return gpumod.describe_vram(self.gpus)

    def status_line(self) -> str:
        f = self.facts
        left = Deadline.fmt(self.deadline.left()) if self.deadline.hours else "no limit"
        return (
            f"open {f.url_shown} | key {f.key_shown} | model {f.model} | mode {f.mode}"
            f"{' x' + str(len(f.upstreams)) if len(f.upstreams) > 1 else ''} ({f.engine}) | "
            f"VRAM {self._vram()} | session left {left}"
        )

    def _banner(self) -> None:
        f = self.facts
        u = f.url_shown
        api = (
            f"{u}r/{OLLAMA_ROUTE}/api/chat (Ollama API), {u}r/{OLLAMA_ROUTE}/v1 (OpenAI API)"
            if self._route_name() == OLLAMA_ROUTE
            else f"{u}r/{EMBEDDED_ROUTE}/v1 (OpenAI API)"
        )
        self._write_status(state="ready")  # before READY: whoever reads the line finds the file
        self.say(f"READY in {self.facts.timings.get('ready', 0):.1f} s: " + self.status_line())
        self.say(
            f"  browser: {u}{'' if f.webui else ' (no Open WebUI: the API only)'}"
            f"{' (log in with the key, then Open WebUI)' if f.webui else ''}"
        )
        self.say(f"  API:     {api} with 'Authorization: Bearer <key>'")
        self.say(f"  timings: {json.dumps(self.facts.timings)}")
        if self._export_env():
            os.environ.update(self.validate_env())

    def _route_name(self) -> str:
        return OLLAMA_ROUTE if self.facts.engine.startswith("Ollama") else EMBEDDED_ROUTE

    def validate_env(self) -> dict[str, str]:
        """What `bridge validate` reads, for this deployment (the key only when we know it)."""
        route = self._route_name()
        env = {
            "BRIDGE_RELAY_URL": self.facts.url.rstrip("/"),
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
            "upstreams": self.facts.upstreams,
            "local_endpoint": self.facts.local_endpoint,
            "webui": self.facts.webui,
            "timings": self.facts.timings,
            "session_end": self.deadline.end,
            "children": {
                c.spec.name: {
                    "pid": c.pid,
                    "restarts": c.restarts,
                    "healthy": c.healthy,
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
        assert self._stop is not None
        last_status = time.monotonic()
        last_touch = 0.0
        summary: dict[str, Any] = {}
        next_cmd_done = False
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), min(self.s.health_interval, 5.0))
            if self._stop.is_set():
                return
            self.gpus = await asyncio.to_thread(gpumod.query) if self.gpus else []
            if time.monotonic() - last_touch >= 60 or not summary:
                last_touch = time.monotonic()
                summary = await asyncio.to_thread(self.hours.touch)
            self._write_status(state="ready")
            for minutes in self.deadline.due_warnings():
                self.say(
                    f"WARNING: the session ends in about {minutes:.0f} min "
                    f"({Deadline.fmt(self.deadline.left())}); the bridge drains "
                    f"{self.s.drain_minutes:.0f} min before. "
                    f"GPU hours (7 days): {summary['session_hours_7d']}"
                )
                if self.s.next_session_cmd and not next_cmd_done:
                    next_cmd_done = True
                    self.say("starting the next session: DEPLOY_NEXT_SESSION_CMD")
                    proc = await asyncio.create_subprocess_shell(
                        self.s.next_session_cmd,
                        stdout=asyncio.subprocess.DEVNULL,
                        stderr=asyncio.subprocess.DEVNULL,
                    )
                    self.say(f"next-session command exited {await proc.wait()}")
            if self.deadline.must_drain():
                self.say(
                    "the session is about to end: draining the bridge so the relay holds new requests "
                    "for the next session"
                )
                return
            if time.monotonic() - last_status >= self.s.status_interval:
                last_status = time.monotonic()
                self.say(f"status: {self.status_line()} | GPU hours 7d {summary['session_hours_7d']}")


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


def _stop_command(settings: Settings) -> int:
    global RUNNING
    if RUNNING is not None:
        RUNNING.stop()
        RUNNING = None
        return 0
    path = settings.state_dir / "status.json"
    with contextlib.suppress(OSError, ValueError, ProcessLookupError):
        data = json.loads(path.read_text())
        if data.get("state") == "ready":
            os.kill(int(data["pid"]), signal.SIGTERM)
            print(f"sent SIGTERM to {data['pid']}")
            return 0
    print("no running deployment")
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


def main(argv: list[str] | None = None) -> int:
    """The command line; in a notebook it returns once the stack is ready (it keeps running in a
    thread: ``%run ... stop`` or the kernel's end stops it)."""
    global RUNNING
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in ("up", "status", "stop", "report") else "up"
    if command == "report":
        return show_report(Path(argv[0] if argv else "validation"))
    settings = parse_settings(argv)
    if command == "status":
        return _status_command(settings)
    if command == "stop":
        return _stop_command(settings)
    if RUNNING is not None and not RUNNING.finished.is_set():
        print("already running in this kernel: " + RUNNING.redact(RUNNING.status_line()))
        return 0
    dep = Deployment(settings)
    background = in_notebook() if settings.background == "auto" else _truthy(settings.background)
    if background:
        RUNNING = dep
        dep.start_background()
        return 0
    return dep.run()


if __name__ == "__main__":
    # one module per process, however often a notebook %runs this file: `status`/`stop` find the
    # deployment the first %run started
    from deployment import kaggle_ollama_webui as _module

    _rc = _module.main()
    if _rc:
        raise SystemExit(_rc)
