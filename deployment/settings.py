"""The deployment's settings: every flag is also an environment variable, and each reads (flag,
else environment, else Kaggle Secrets for the secrets, else default).

``BRIDGE_*`` for what the bridge shares with its other commands (relay URL, node token, client key),
``DEPLOY_*`` for the rest. :func:`parse_settings` gives a :class:`Settings`; on Kaggle the folders
default to the unsaved ``<root>/temp`` for secrets and caches and the saved ``<root>/working`` for
reports only. Secrets are never shown, not even in ``--help``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from deployment import gpus as gpumod
from deployment import handover, ollama_setup, webui_setup
from deployment.session import KagglePaths, get_secret, kaggle_root, on_kaggle

#: The checkout this code runs from (when it runs from one: ``.venv-webui``, ``pip install``).
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OLLAMA_MODEL = "qwen3:8b"
#: What ``python -m deployment --help`` says first.
DESCRIPTION = (
    "Kaggle deployment: Ollama (or the embedded llama.cpp engine) + Open WebUI + the bridge, supervised."
)
#: Holds the ``BRIDGE_RELAY`` a run exported for `bridge validate` (``--export-env``) when the user
#: had set none, so that a later run in the same kernel does not take it for the user's setting.
EXPORTED_RELAY = "DEPLOY_EXPORTED_RELAY"


def code_root() -> Path:
    """The folder holding the ``bridge`` package this process imports: the children run
    ``python -m bridge.cli`` from there, so they run the same code (a clone in the notebook's
    working directory, or an installed copy)."""
    spec = importlib.util.find_spec("bridge")
    if spec is None or spec.origin is None:
        return ROOT
    return Path(spec.origin).resolve().parent.parent


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
    prompt_cache: int = 256
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
    webui_admin_email: str = ""
    webui_admin_password: str = ""
    listen_port: int = 0
    session_hours: float = -1.0
    session_start: float = 0.0
    serve_minutes: float = 0.0
    warn_minutes: str = "60,30,10"
    drain_minutes: float = 5.0
    drain_timeout: float = 30.0
    next_kernel: str = ""
    next_minutes: float = 60.0
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
FLAGS: dict[str, tuple[str, str]] = {
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
    "prompt_cache": (
        "DEPLOY_PROMPT_CACHE",
        "embedded: MiB of KV states the engine keeps so that several chats resume from their cached "
        "prompt (llama-cpp-python's RAM cache; about 18 KiB a token on Gemma 3 270M; 0: only the "
        "last request's)",
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
    "webui_admin_email": (
        "DEPLOY_WEBUI_ADMIN_EMAIL",
        "Open WebUI's admin account (default: the local relay's key's, <key id>@relay.invalid; "
        "else admin@localhost)",
    ),
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
    "warn_minutes": (
        "DEPLOY_WARN_MINUTES",
        "warn this many minutes before the end (comma-separated; empty: no warnings)",
    ),
    "drain_minutes": ("DEPLOY_DRAIN_MINUTES", "drain the bridge this many minutes before the end"),
    "drain_timeout": (
        "BRIDGE_DRAIN_TIMEOUT",
        "seconds the bridge lets requests in flight finish when stopping",
    ),
    "next_kernel": (
        "DEPLOY_NEXT_KERNEL",
        "USER/SLUG of this notebook: --next-minutes before the session's end push it as the next "
        "session (KAGGLE_USERNAME/KAGGLE_KEY from Kaggle Secrets) and drain once its bridge connects",
    ),
    "next_minutes": (
        "DEPLOY_NEXT_MINUTES",
        "start the next session (--next-kernel, --next-session-cmd) this many minutes before the "
        "session's end, whatever --warn-minutes says (more than --drain-minutes)",
    ),
    "next_accelerator": ("DEPLOY_NEXT_ACCELERATOR", "the next session's accelerator (kaggle kernels push)"),
    "next_session_cmd": (
        "DEPLOY_NEXT_SESSION_CMD",
        "shell command run at --next-minutes instead of the push (its output is logged, redacted)",
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


def truthy(value: str | bool) -> bool:
    return value if isinstance(value, bool) else value.strip().lower() in ("1", "true", "yes", "on")


def build_parser(env: dict[str, str] | None = None) -> argparse.ArgumentParser:
    env = dict(os.environ if env is None else env)
    ap = argparse.ArgumentParser(
        prog="python -m deployment",
        description=DESCRIPTION,
        epilog="Commands besides running the stack (`up`, the default): `status`, `stop` (the "
        "deployment in --state-dir), `doctor` (check this machine; safe to paste) and `report DIR` "
        "(show a `bridge validate` report).",
    )
    defaults = Settings()
    for f in fields(Settings):
        var, text = FLAGS[f.name]
        flag = "--" + f.name.replace("_", "-")
        default: Any = getattr(defaults, f.name)
        raw = env.get(var)
        kind: Any = {"int": int, "float": float, "Path": Path}.get(str(f.type), str)
        if str(f.type) == "bool":
            value = truthy(raw) if raw is not None else default
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
    if (s.next_kernel or s.next_session_cmd) and s.next_minutes <= s.drain_minutes:
        raise SystemExit(
            f"error: --next-minutes {s.next_minutes:g} starts the next session after this one drains "
            f"(--drain-minutes {s.drain_minutes:g}): it must be more"
        )
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
