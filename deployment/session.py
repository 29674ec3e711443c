"""The notebook session: secrets, the 12-hour deadline, and the weekly GPU-hours record.

Secrets come from the environment first, then from Kaggle Secrets
(``kaggle_secrets.UserSecretsClient().get_secret(NAME)``, "Add-ons > Secrets" in the notebook
editor); never from the notebook's text. :class:`Redactor` masks every secret value in whatever the
deployment prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

WEEK = 7 * 24 * 3600


def get_secret(name: str, env: dict[str, str] | None = None) -> str:
    """``$NAME``, else the Kaggle Secret ``NAME``, else ""."""
    value = (env if env is not None else os.environ).get(name, "")
    if value:
        return value
    try:
        from kaggle_secrets import UserSecretsClient  # only inside a Kaggle notebook
    except ImportError:
        return ""
    try:
        return str(UserSecretsClient().get_secret(name) or "")
    except Exception:  # not attached to this notebook, or no access
        return ""


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


def session_start(given: float = 0.0) -> float:
    """When this session began: ``given`` (epoch seconds), else the start of this process (in a
    notebook: the kernel, started with the session)."""
    if given > 0:
        return given
    with contextlib.suppress(Exception):
        return float(psutil.Process().create_time())
    return time.time()


@dataclass
class Deadline:
    """The session's end (Kaggle: 12 h after it started) and the warnings before it."""

    start: float
    hours: float = 12.0
    warn_minutes: tuple[float, ...] = (60.0, 30.0, 10.0)
    drain_minutes: float = 5.0
    warned: set[float] = field(default_factory=set)

    @property
    def end(self) -> float:
        return self.start + self.hours * 3600

    def left(self, now: float | None = None) -> float:
        return self.end - (time.time() if now is None else now)

    def due_warnings(self, now: float | None = None) -> list[float]:
        """Warnings (minutes before the end) that became due and were not given yet (none without
        a limit: ``hours`` 0)."""
        if not self.hours:
            return []
        left_min = self.left(now) / 60
        due = [m for m in self.warn_minutes if left_min <= m and m not in self.warned]
        self.warned.update(due)
        return due

    def must_drain(self, now: float | None = None) -> bool:
        return bool(self.hours) and self.left(now) <= self.drain_minutes * 60

    @staticmethod
    def fmt(seconds: float) -> str:
        seconds = max(0, int(seconds))
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class GpuHours:
    """A JSON record of sessions (start, last seen, GPUs) to know the GPU hours used this week.

    Kaggle counts a GPU session's wall time against a weekly quota (about 30 h), whatever the
    number of GPUs. The file lives in the state directory (on Kaggle ``/kaggle/working``, which is
    kept only when the notebook is saved as a version: point ``--gpu-hours-file`` at a dataset
    or somewhere you keep to carry it across sessions).
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(self.path)
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
