"""``python -m deployment doctor``: check the real environment, print each problem with its fix.

Run it on Kaggle (a cell: ``!python -m deployment doctor``) or anywhere. Its output is safe to
paste into a bug report: secrets appear by name only (set, and where from), the relay's URL is
never shown, and every line passes the deployment's redactor.

Checks: Python and how Open WebUI's venv will be made (ensurepip, pip, uv); the GPUs and the NVIDIA
driver (Ollama 0.20.0 needs >= 531, else it runs on the CPU); the Ollama install and which CUDA
library its last start used (``inference compute`` in its log); free disk where the caches
(temp) and the saved output (working) go; the secrets; the relay reachable, and the node token
accepted (a short ``bridge connect``); the time left in the session.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from deployment import gpus as gpumod
from deployment import handover, ollama_setup, placement, webui_setup
from deployment.children import child_env
from deployment.relay import host_of, http_url
from deployment.session import Deadline, Redactor, batch_run, find_secret, on_kaggle, session_start
from deployment.settings import Settings, code_root, parse_settings

GB = 1e9
#: Free space the caches need in temp: Ollama (archive + unpacked, about 4 GB), qwen3:8b (5 GB),
#: Open WebUI's venv (3 GB), with room to spare.
TEMP_NEEDS = 15 * GB
#: Secrets the deployment reads: name -> what it is for.
SECRETS = {
    "BRIDGE_RELAY": "the relay's URL (without it a local relay only this notebook reaches)",
    "BRIDGE_NODE_TOKEN": "the relay's node token (`bridge token` on the relay)",
    "BRIDGE_KEY": "a client key of the relay (validation runs, the status line)",
    "DEPLOY_WEBUI_ADMIN_PASSWORD": "Open WebUI's admin password (else generated into the state dir)",
    "KAGGLE_USERNAME": "the Kaggle CLI, to start the next session (with KAGGLE_KEY)",
    "KAGGLE_KEY": "the Kaggle CLI's key (or KAGGLE_API_TOKEN)",
    "KAGGLE_API_TOKEN": "the Kaggle CLI's token (instead of KAGGLE_USERNAME/KAGGLE_KEY)",
    "CLOUDFLARE_API_TOKEN": "deploy the relay on Cloudflare (when BRIDGE_RELAY is not set)",
}


@dataclass
class Check:
    name: str
    level: str  # "ok", "warn", "FAIL", "info"
    text: str
    fix: str = ""


class Doctor:
    def __init__(self, settings: Settings, say: Callable[[str], None] = print) -> None:
        self.s = settings
        self.redact = Redactor()
        self.redact.add(*settings.secrets(), settings.relay, http_url(settings.relay).rstrip("/"))
        if settings.relay:
            self.redact.add(host_of(settings.relay))
        self._say = say
        self.checks: list[Check] = []

    def add(self, name: str, level: str, text: str, fix: str = "") -> None:
        check = Check(name, level, self.redact(text), self.redact(fix))
        self.checks.append(check)
        self._say(f"[{check.level:>4}] {check.name}: {check.text}")
        if check.fix:
            self._say(f"       fix: {check.fix}")

    # ------------------------------------------------------------------------------ the checks
    def python(self) -> None:
        v = sys.version.split()[0]
        pip = webui_setup.has_module(sys.executable, "pip")
        ensurepip = webui_setup.has_module(sys.executable, "ensurepip")
        uv = webui_setup.find_uv(self.s.cache_dir)
        how = (
            f"uv ({uv})"
            if uv
            else "uv installed from PyPI with pip"
            if pip
            else "python -m venv"
            if ensurepip
            else ""
        )
        self.add(
            "python",
            "ok" if how else "FAIL",
            f"{v} at {sys.executable}; pip {'yes' if pip else 'no'}, "
            f"ensurepip {'yes' if ensurepip else 'no'}, uv {uv or 'not found'}; "
            f"Open WebUI's venv: {how or 'impossible'}",
            "" if how else "install uv (curl -LsSf https://astral.sh/uv/install.sh | sh) or pip",
        )

    def gpus(self) -> list[gpumod.Gpu]:
        found = gpumod.query()
        if not found:
            self.add(
                "gpus",
                "FAIL" if on_kaggle() else "info",
                "none visible (NVML and nvidia-smi found none)",
                "notebook settings: Accelerator 'GPU T4 x2' (Ollama needs a GPU; without one the "
                "embedded engine runs on the CPU)"
                if on_kaggle()
                else "",
            )
            return found
        names = ", ".join(f"GPU{g.index} {g.name} {g.total / gpumod.GIB:.1f} GiB" for g in found)
        self.add("gpus", "ok", f"{len(found)}: {names}")
        problem = gpumod.driver_problem(found)
        driver = found[0].driver or "unknown"
        self.add(
            "driver",
            "FAIL" if problem else "ok" if found[0].driver else "warn",
            problem or f"NVIDIA driver {driver} (Ollama needs >= {gpumod.MIN_DRIVER})",
            "a newer Kaggle image, or an older Ollama (--ollama-version) built for this driver"
            if problem
            else "",
        )
        return found

    def ollama(self) -> None:
        s = self.s
        exe = shutil.which(s.ollama) if s.ollama else shutil.which("ollama")
        installed = s.cache_dir / f"ollama-{s.ollama_version}" / "bin" / "ollama"
        path = Path(exe) if exe else installed if installed.is_file() else None
        if path is None:
            self.add(
                "ollama",
                "info",
                f"{s.ollama_version} not installed yet (the first run downloads it into {s.cache_dir}, "
                "verified against the release's sha256sum.txt)",
            )
            return
        libdir = path.resolve().parent.parent / "lib" / "ollama"
        cuda = sorted(p.name for p in libdir.glob("cuda_v*")) if libdir.is_dir() else []
        version = ollama_setup.version_of(str(path))
        logs = sorted((s.state_dir / "logs").glob("ollama*.log"), key=lambda p: p.stat().st_mtime)
        used = ""
        for log in reversed(logs):
            used = placement.describe_compute(placement.inference_compute(log.read_text(errors="replace")))
            if used:
                used = f"; its last start ({log.name}) used {used}"
                break
        level = "FAIL" if used.endswith(" used cpu") else "ok"
        self.add(
            "ollama",
            level,
            f"{version or 'version unknown'} at {path}; CUDA libraries {', '.join(cuda) or 'none found'}"
            + (used or "; not started yet (no log)"),
            "Ollama found no usable GPU: see the driver and gpus lines" if level == "FAIL" else "",
        )

    def disk(self) -> None:
        for label, path, need, what in (
            ("disk temp", self.s.cache_dir, TEMP_NEEDS, "Ollama, the model and Open WebUI's venv"),
            ("disk reports", self.s.reports_dir, 1 * GB, "reports, saved with the notebook"),
        ):
            probe = path
            while not probe.exists() and probe != probe.parent:
                probe = probe.parent
            free = shutil.disk_usage(probe).free
            self.add(
                label,
                "ok" if free >= need else "warn",
                f"{free / GB:.1f} GB free at {path} ({what}; needs about {need / GB:.0f} GB)",
                "" if free >= need else f"free space under {probe}, or point the folder elsewhere",
            )

    def secrets(self) -> dict[str, str]:
        values = {}
        for name, purpose in SECRETS.items():
            value, source = find_secret(name)
            values[name] = value
            self.redact.add(value)
            self.add(
                f"secret {name}",
                "ok" if value else "info",
                f"{'set (' + source + ')' if value else 'not set'}: {purpose}",
            )
        if values["BRIDGE_RELAY"] and not values["BRIDGE_NODE_TOKEN"]:
            self.add(
                "secrets",
                "FAIL",
                "BRIDGE_RELAY without BRIDGE_NODE_TOKEN",
                "add BRIDGE_NODE_TOKEN in Add-ons > Secrets",
            )
        if self.s.next_kernel and not handover._complete({k: v for k, v in values.items() if v}):
            self.add(
                "secrets",
                "FAIL",
                f"next session {self.s.next_kernel} needs KAGGLE_USERNAME and KAGGLE_KEY "
                "(or KAGGLE_API_TOKEN)",
                "Add-ons > Secrets, and attach them to this notebook",
            )
        return values

    def relay(self, relay: str, token: str, wait: float = 20.0) -> None:
        if not relay:
            self.add("relay", "info", "none configured (BRIDGE_RELAY): a local relay starts with the stack")
            return
        url = http_url(relay).rstrip("/") + "/_relay/health"
        try:
            r = httpx.get(url, timeout=15)
            health = r.json() if r.status_code == 200 else {}
        except (httpx.HTTPError, ValueError) as exc:
            self.add(
                "relay",
                "FAIL",
                f"unreachable: {type(exc).__name__}: {exc}",
                "check BRIDGE_RELAY and that the relay runs",
            )
            return
        if r.status_code != 200:
            self.add(
                "relay",
                "FAIL",
                f"/_relay/health answered HTTP {r.status_code}",
                "is BRIDGE_RELAY the relay's URL?",
            )
            return
        self.add(
            "relay",
            "ok",
            f"reachable (version {health.get('version', '?')}, "
            f"{health.get('nodes', '?')} bridge(s) connected)",
        )
        if not token:
            return
        self.add("node token", *self._try_token(relay, token, wait))

    def _try_token(self, relay: str, token: str, wait: float) -> tuple[str, str, str]:
        """A short ``bridge connect`` with the token (a route nothing asks for): accepted, refused,
        or no answer."""
        env = {**child_env(BRIDGE_NODE_TOKEN=token)}
        argv = [
            sys.executable, "-m", "bridge.cli", "connect", "--relay", relay,
            "--route", "doctor=http://127.0.0.1:9", "--node-name", "doctor-check",
            "--backoff-max", "1", "--sample-interval", "0", "--log-level", "info",
        ]  # fmt: skip
        proc = subprocess.Popen(
            argv, env=env, cwd=code_root(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,
        )  # fmt: skip
        lines: list[str] = []

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line.rstrip())

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                if any("connected to the relay" in x for x in lines):
                    return "ok", "accepted (a test bridge connected, then left)", ""
                if proc.poll() is not None:
                    reader.join(5)
                    last = next((x for x in reversed(lines) if x.strip()), f"exit {proc.returncode}")
                    return "FAIL", f"refused: {last}", "copy the token again: `bridge token` on the relay"
                time.sleep(0.2)
            return "FAIL", f"no connection in {wait:.0f} s: {lines[-1] if lines else 'no output'}", ""
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def time_left(self) -> None:
        kaggle = on_kaggle()
        start, source = session_start(self.s.session_start, container=kaggle)
        hours = self.s.session_hours if self.s.session_hours >= 0 else (12.0 if kaggle else 0.0)
        if not hours:
            self.add("session", "info", "no time limit (not on Kaggle)")
            return
        d = Deadline(start, hours)
        began = time.strftime("%H:%M:%S", time.localtime(start))
        run = "batch (ends after the last cell)" if batch_run() else "interactive"
        self.add(
            "session",
            "ok" if d.left() > 3600 else "warn",
            f"{run}; started {began} ({source}); {Deadline.fmt(d.left())} left of {hours:g} h",
        )

    def run(self) -> int:
        self._say("kaggle-bridge doctor (safe to paste: secrets by name only, the relay's URL hidden)")
        self.python()
        self.gpus()
        self.ollama()
        self.disk()
        values = self.secrets()
        self.relay(values["BRIDGE_RELAY"] or self.s.relay, values["BRIDGE_NODE_TOKEN"] or self.s.node_token)
        self.time_left()
        failed = [c for c in self.checks if c.level == "FAIL"]
        warned = [c for c in self.checks if c.level == "warn"]
        self._say(f"{len(failed)} problem(s), {len(warned)} warning(s)")
        return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    settings = parse_settings(list(argv or []))
    return Doctor(settings).run()
