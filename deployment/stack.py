"""One run's shared state: what every room of the deployment reads and writes.

A :class:`Stack` is the settings, the output (every line redacted, also into ``<state>/logs``), the
:class:`Facts` the status line shows, the session's deadline and GPU-hours record, the record of
children and the flags that say how the run goes (ready, finished, cancelled). The rooms are
functions over it: ``relay`` (which relay the bridge dials), ``engines`` (Ollama or the embedded
engine), ``webui``, ``status`` (the status line and ``status.json``), ``serving`` (READY to the
drain); ``orchestration.Deployment`` is a Stack with a life: it brings the rooms up in order, in a
thread or not, and stops them.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from deployment import gpus as gpumod
from deployment.children import Children
from deployment.session import Deadline, GpuHours, Redactor, on_kaggle, session_start
from deployment.settings import Settings
from deployment.supervisor import Supervisor

#: The bridge's route to the embedded engine (OpenAI's API), and to Ollama's API (either engine).
EMBEDDED_ROUTE = "engine"
OLLAMA_ROUTE = "ollama"


def first_line(text: str, limit: int = 160) -> str:
    line = next((x.strip() for x in str(text).splitlines() if x.strip()), "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


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


class Stack:
    """The state of one run. Written by the thread that runs the stack (only the stop flags by
    others: ``cancel``, ``stop_reason``), read by any (the notebook's live line, ``status``)."""

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
        self.gpus: list[gpumod.Gpu] = []
        kaggle = on_kaggle({**os.environ, "DEPLOY_KAGGLE_ROOT": str(settings.kaggle_root)})
        start, self.session_source = session_start(settings.session_start, container=kaggle)
        self.deadline = Deadline(
            start,
            settings.session_hours if settings.session_hours >= 0 else (12.0 if kaggle else 0.0),
            tuple(float(m) for m in settings.warn_minutes.split(",") if m.strip()),
            settings.drain_minutes,
            handover_minutes=settings.next_minutes,
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
        self.t0 = time.monotonic()  # the run's start, for the timings
        self.run_started = time.time()  # the same, against file times (a stop-request's)

    def say(self, msg: str) -> None:
        line = self.redact(f"[deploy {time.strftime('%H:%M:%S')}] {msg}")
        if not self.ready.is_set():
            self.phase = first_line(self.redact(msg), 120)
        print(line, file=self.out, flush=True)
        with contextlib.suppress(OSError):
            self.logs.mkdir(parents=True, exist_ok=True)
            with open(self.logs / "deploy.log", "a") as f:
                f.write(line + "\n")

    def mark(self, what: str) -> None:
        """Record how long the run took to get to ``what`` (the READY line's timings)."""
        self.facts.timings[what] = round(time.monotonic() - self.t0, 2)
