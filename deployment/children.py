"""Every process the deployment starts, recorded the moment it starts (``<state>/children.json``).

A notebook kernel can die at any moment: the user restarts it, Kaggle ends the session, an
interrupted cell never reached its clean-up. The children run in sessions of their own (so a stop
takes down each child's whole process group), which also means they outlive a dead kernel and keep
their ports (Ollama's 11434). So each child is written to the record as it is spawned, not once
the stack is ready, and the next run in the same state dir stops what a dead owner left behind
before it starts anything. A recorded process is stopped only while it is still the same process:
its pid *and* its start time match (pids are reused).

The record also keeps one deployment per state dir: while its owner is alive and its children run,
a second run refuses to start instead of fighting it for the ports.

Installers and other short-lived helpers go through :func:`run_recorded`: recorded the same way,
killed when the bring-up is cancelled (an interrupted cell), their output in a log file. Every
child gets :func:`child_env`: our environment without the deployment's own settings.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from deployment.session import process_start, write_atomic

Say = Callable[[str], None]


class AlreadyRunning(RuntimeError):
    """Another live process runs a deployment in this state dir."""


class Cancelled(RuntimeError):
    """The bring-up was cancelled (an interrupted cell, a stop) while a helper ran."""


@dataclass
class Record:
    name: str
    pid: int
    started: float  # the process's start time, epoch seconds (tells a reused pid apart)
    argv0: str


def same_process(pid: int, started: float) -> bool:
    """Is ``pid`` still the process that started at ``started``?"""
    return pid > 0 and started > 0 and abs(process_start(pid) - started) < 0.05


class Children:
    """The record in ``path``: ``{"owner": {...}, "children": [...]}``, rewritten atomically on
    every change (from the supervisor's loop and from installer threads: a lock)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.owner = {"pid": os.getpid(), "started": process_start()}
        self._records: dict[int, Record] = {}
        self._lock = threading.Lock()
        #: Why the record could not be written last (a full disk), else "": the record in memory
        #: stays the authority for this run's stop; only a later run's clean-up loses what is new.
        self.write_error = ""

    def _write(self) -> None:
        """Best effort: a stop must go on when the disk is full (each stopped child is removed)."""
        data = {"owner": self.owner, "children": [asdict(r) for r in self._records.values()]}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(data, indent=1))
        except OSError as exc:
            self.write_error = f"{self.path}: {exc}"
        else:
            self.write_error = ""

    def previous(self) -> tuple[dict[str, float], list[Record]]:
        try:
            data = json.loads(self.path.read_text())
            owner = {k: float(v) for k, v in dict(data.get("owner") or {}).items()}
            records = [Record(**r) for r in data.get("children", [])]
        except (OSError, ValueError, TypeError):
            return {}, []
        return owner, records

    def claim(self, say: Say) -> list[Record]:
        """Make this process the owner: stop every recorded process a dead owner left running
        (returned), or raise :class:`AlreadyRunning` while a live owner's children still run."""
        owner, records = self.previous()
        live = [r for r in records if same_process(r.pid, r.started)]
        owner_pid = int(owner.get("pid", 0))
        if live and owner_pid != os.getpid() and same_process(owner_pid, owner.get("started", 0)):
            raise AlreadyRunning(
                f"a deployment (pid {owner_pid}) is running in {self.path.parent}: stop it first "
                "(python -m deployment stop, or interrupt its cell) or use another --state-dir"
            )
        for r in live:
            kill_group(r.pid)
            say(f"stopped {r.name} (pid {r.pid}), left running by a previous run that died")
        with self._lock:
            self._records.clear()
            self._write()
        return live

    def add(self, name: str, pid: int, argv0: str = "") -> None:
        with self._lock:
            self._records[pid] = Record(name, pid, process_start(pid) or time.time(), argv0)
            self._write()

    def remove(self, pid: int) -> None:
        with self._lock:
            if self._records.pop(pid, None) is not None:
                self._write()

    def running(self) -> list[Record]:
        with self._lock:
            return [r for r in self._records.values() if same_process(r.pid, r.started)]

    def kill_all(self) -> None:
        """The last resort of a stop: whatever is still recorded."""
        for r in self.running():
            kill_group(r.pid)
            self.remove(r.pid)


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group ``pid`` leads (a child started in a session of its own), and the
    process itself in case it left its group."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without the BRIDGE_*/DEPLOY_* settings (each child gets its flags
    explicitly) plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "DEPLOY_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_recorded(
    name: str,
    argv: Sequence[str],
    *,
    log: Path,
    children: Children | None,
    cancel: threading.Event | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float | None = None,
) -> int:
    """Run a helper (an installer) to its end, output appended to ``log``; recorded while it runs.
    Raises :class:`Cancelled` (after killing it) when ``cancel`` is set, TimeoutError past
    ``timeout``. Returns its exit code."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {name}: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        if children is not None:
            children.add(name, proc.pid, os.path.basename(argv[0]))
        while True:
            with contextlib.suppress(subprocess.TimeoutExpired):
                return proc.wait(0.2)
            if cancel is not None and cancel.is_set():
                raise Cancelled(f"{name} cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{name} took more than {timeout:.0f} s")
    finally:
        if proc.returncode is None:
            kill_group(proc.pid)
            proc.wait()
        if children is not None:
            children.remove(proc.pid)


def tail(path: Path, lines: int = 8) -> str:
    """The last lines of a log, for an error message."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])
