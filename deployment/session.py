"""The notebook session: where Kaggle keeps things, secrets, the 12-hour deadline, and the weekly
GPU-hours record.

Kaggle: ``/kaggle/working`` is saved as the notebook's output with every version (public when the
notebook is), about 20 GB; any other folder, such as ``/kaggle/temp`` (ours to create), is on the
same disk (about 73 GB in all) and never saved (Kaggle's notebook docs; a Kaggle guide read 2026-12;
/work/shared/notes/kaggle-image.md). Whether the container's first process (PID 1) starts with the
session is not documented: the first lines of a run say which start the deadline counts from, to be
checked on the first real run (docs/kaggle.md). So everything that holds a
secret (tokens, passwords, Open WebUI's database, logs) and every large cache lives under
``/kaggle/temp``; only what a user wants to keep (validation reports, the GPU-hours record) goes to
``/kaggle/working``. ``DEPLOY_KAGGLE_ROOT`` moves ``/kaggle`` (tests, unusual images).

Secrets come from the environment first, then from Kaggle Secrets
(``kaggle_secrets.UserSecretsClient().get_secret(NAME)``, "Add-ons > Secrets" in the notebook
editor: an HTTP request to Kaggle, see Kaggle/docker-python ``patches/kaggle_secrets.py``); never
from the notebook's text. :class:`Redactor` masks every secret value in whatever the deployment
prints.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

WEEK = 7 * 24 * 3600
#: Kaggle's limit on one GPU session.
KAGGLE_SESSION_HOURS = 12.0


# ------------------------------------------------------------------------------------ Kaggle's folders
def kaggle_root(env: Mapping[str, str] | None = None) -> Path:
    """``/kaggle``, or ``DEPLOY_KAGGLE_ROOT``."""
    env = os.environ if env is None else env
    return Path(env.get("DEPLOY_KAGGLE_ROOT") or "/kaggle")


def on_kaggle(env: Mapping[str, str] | None = None) -> bool:
    """Inside a Kaggle notebook: Kaggle sets ``KAGGLE_KERNEL_RUN_TYPE`` (``Interactive`` or ``Batch``)
    in every kernel; ``<root>/working`` is the other sign."""
    env = os.environ if env is None else env
    return bool(env.get("KAGGLE_KERNEL_RUN_TYPE")) or (kaggle_root(env) / "working").is_dir()


def batch_run(env: Mapping[str, str] | None = None) -> bool:
    """A "Save & Run All" or a pushed version: the session ends after the last cell."""
    env = os.environ if env is None else env
    return env.get("KAGGLE_KERNEL_RUN_TYPE", "").lower() == "batch"


@dataclass(frozen=True)
class KagglePaths:
    """Where things go on Kaggle: ``state`` (secrets, logs, databases) and ``cache`` (downloads,
    models, venvs) under the unsaved temp folder, ``reports`` under the saved output."""

    root: Path

    @property
    def working(self) -> Path:
        return self.root / "working"

    @property
    def temp(self) -> Path:
        return self.root / "temp"

    @property
    def state(self) -> Path:
        return self.temp / "kaggle-bridge"

    @property
    def cache(self) -> Path:
        return self.temp / "kaggle-bridge-cache"

    @property
    def reports(self) -> Path:
        return self.working / "kaggle-bridge"


def get_secret(name: str, env: Mapping[str, str] | None = None) -> str:
    """``$NAME``, else the Kaggle Secret ``NAME``, else ""."""
    return find_secret(name, env)[0]


def find_secret(name: str, env: Mapping[str, str] | None = None) -> tuple[str, str]:
    """The secret ``name`` and where it came from: ``environment``, ``Kaggle Secrets`` or ""."""
    value = (env if env is not None else os.environ).get(name, "")
    if value:
        return value, "environment"
    try:
        from kaggle_secrets import UserSecretsClient  # only inside a Kaggle notebook
    except ImportError:
        return "", ""
    try:
        # Kaggle answers a label that is not attached to this notebook with an error (BackendError)
        found = str(UserSecretsClient().get_secret(name) or "")
    except Exception:
        return "", ""
    return found, "Kaggle Secrets" if found else ""


def read_or_make(path: Path, make: Callable[[], str]) -> str:
    """A secret kept in the state dir (mode 0600) so restarts keep it."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = make()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value + "\n")
    return value


def write_atomic(path: Path, text: str) -> None:
    """``path``'s new content, whole or not at all for a reader (a temp file beside it, renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def mask(secret: str) -> str:
    """What may be shown of a secret: its first 3 and last 2 characters."""
    if len(secret) < 12:
        return "***"
    return f"{secret[:3]}...{secret[-2:]}"


@dataclass
class Redactor:
    secrets: set[str] = field(default_factory=set)

    def add(self, *values: str) -> None:
        self.secrets.update(v for v in values if v and len(v) >= 6)

    def __call__(self, text: str) -> str:
        for s in sorted(self.secrets, key=len, reverse=True):
            if s in text:
                text = text.replace(s, mask(s))
        return text


def process_start(pid: int | None = None) -> float:
    """When process ``pid`` (default: this one) started, epoch seconds; 0 when unknown."""
    with contextlib.suppress(Exception):
        return float(psutil.Process(pid).create_time())
    return 0.0


def session_start(
    given: float = 0.0, *, container: bool = False, now: float | None = None
) -> tuple[float, str]:
    """When this session began, and how that was found.

    ``given`` (epoch seconds, ``DEPLOY_SESSION_START``) wins. On Kaggle (``container``) the session
    is the container: its first process (PID 1 in the container's PID namespace) started with it,
    while the kernel restarts whenever the user restarts it, which would push the drain past the real
    end. A PID 1 older than a Kaggle session can be is not a session's container (a laptop's init):
    then, and off Kaggle, this process's start.
    """
    now = time.time() if now is None else now
    if given > 0:
        return given, "DEPLOY_SESSION_START"
    if container:
        first = process_start(1)
        if first and 0 <= now - first <= (KAGGLE_SESSION_HOURS + 1) * 3600:
            return first, "the container's start (pid 1)"
    return process_start() or now, "this process's start"


@dataclass
class Deadline:
    """The run's end, the warnings before it, and the time to start the next session.

    Two limits, the earlier wins: the session's (Kaggle: 12 h after the container started; ``hours``
    0: none) and an optional ``stop_at`` (epoch seconds: ``--serve-minutes`` after READY, to spend
    fewer GPU hours). Only a run that ends with the session hands over to a next one, at
    ``handover_minutes`` before the session's end, whatever the warnings are.
    """

    start: float
    hours: float = 12.0
    warn_minutes: tuple[float, ...] = (60.0, 30.0, 10.0)
    drain_minutes: float = 5.0
    warned: set[float] = field(default_factory=set)
    stop_at: float = 0.0
    handover_minutes: float = 60.0

    @property
    def session_end(self) -> float:
        return self.start + self.hours * 3600 if self.hours else math.inf

    @property
    def end(self) -> float:
        return min(self.session_end, self.stop_at or math.inf)

    @property
    def limited(self) -> bool:
        return self.end < math.inf

    @property
    def ends_with_session(self) -> bool:
        return bool(self.hours) and self.session_end <= (self.stop_at or math.inf)

    def left(self, now: float | None = None) -> float:
        return self.end - (time.time() if now is None else now)

    def due_warnings(self, now: float | None = None) -> list[float]:
        """Warnings (minutes before the end) that became due and were not given yet (none without
        a limit)."""
        if not self.limited:
            return []
        left_min = self.left(now) / 60
        due = [m for m in self.warn_minutes if left_min <= m and m not in self.warned]
        self.warned.update(due)
        return due

    def handover_due(self, now: float | None = None) -> bool:
        """Time to start the next session: ``handover_minutes`` before the session's end (its own
        time: with no warnings, or other ones, too). Never for a run that ends before the session
        (``--serve-minutes``: the user's own end) or one without a session limit."""
        if not self.ends_with_session:
            return False
        now = time.time() if now is None else now
        return self.session_end - now <= self.handover_minutes * 60

    def must_drain(self, now: float | None = None) -> bool:
        """At ``stop_at`` (``--serve-minutes`` after READY: the user's own end, nothing kills the
        session there), or ``drain_minutes`` before the session's end (Kaggle's hard kill)."""
        now = time.time() if now is None else now
        if self.stop_at and now >= self.stop_at:
            return True
        return bool(self.hours) and self.session_end - now <= self.drain_minutes * 60

    @staticmethod
    def fmt(seconds: float) -> str:
        """``3h07m``; under an hour ``14m05s``."""
        seconds = max(0, int(seconds))
        if seconds < 3600:
            return f"{seconds // 60}m{seconds % 60:02d}s"
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class GpuHours:
    """A JSON record of sessions (start, last seen, GPUs) to know the GPU hours used this week.

    Kaggle counts a GPU session's wall time against a weekly quota (about 30 h), whatever the
    number of GPUs. The file lives in the state directory (on Kaggle ``/kaggle/working``, which is
    kept only when the notebook is saved as a version: point ``--gpu-hours-file`` at a writable
    place you keep to carry it across sessions; a dataset under ``/kaggle/input`` is read-only).
    A file that cannot be written does not stop the service (a warning, once).
    """

    def __init__(self, path: Path, session_id: str, start: float, gpus: list[str]) -> None:
        self.path = path
        self.session_id = session_id
        self.start = start
        self.gpus = gpus

    def _load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            if isinstance(data, dict) and isinstance(data.get("sessions"), list):
                return data
        except (OSError, ValueError):
            pass
        return {"sessions": []}

    def touch(self, now: float | None = None) -> dict[str, Any]:
        """Record this session as alive until ``now``; return the summary."""
        now = time.time() if now is None else now
        data = self._load()
        sessions: list[dict[str, Any]] = data["sessions"]
        mine = next((s for s in sessions if s.get("id") == self.session_id), None)
        if mine is None:
            mine = {"id": self.session_id, "start": self.start, "gpus": self.gpus}
            sessions.append(mine)
        mine["last_seen"] = now
        data["sessions"] = [s for s in sessions if now - float(s.get("last_seen", 0)) < 5 * WEEK]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(data, indent=1))
        return self.summary(data, now)

    @staticmethod
    def summary(data: dict[str, Any], now: float) -> dict[str, Any]:
        since = now - WEEK
        hours = 0.0
        gpu_hours = 0.0
        for s in data["sessions"]:
            if not s.get("gpus"):
                continue
            a, b = max(float(s["start"]), since), float(s.get("last_seen", s["start"]))
            if b > a:
                hours += (b - a) / 3600
                gpu_hours += (b - a) / 3600 * len(s["gpus"])
        return {"session_hours_7d": round(hours, 2), "device_hours_7d": round(gpu_hours, 2)}
