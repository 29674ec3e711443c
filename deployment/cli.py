"""``python -m deployment [up|status|stop|doctor|report DIR] [flags]``: the command line.

``up`` (the default) runs the stack in this thread until SIGINT/SIGTERM or the session's end (under
a running event loop it returns once ready, the stack in a thread); ``status`` and ``stop`` reach the
deployment in ``--state-dir`` (or the one running in this process, a notebook's kernel) through
``status.json`` and ``stop-request``; ``doctor`` checks this machine; ``report DIR`` shows a
``bridge validate`` report. ``--help`` lists every flag with its environment variable.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from deployment.children import AlreadyRunning, Children, same_process
from deployment.orchestration import Deployment
from deployment.session import Redactor, write_atomic
from deployment.settings import Settings, in_notebook, parse_settings, truthy

#: The deployment running in this process (a notebook kernel), for `status` and `stop`.
RUNNING: Deployment | None = None


#: status.json's states of a run still going (its others: ``stopped``, ``failed``).
LIVE_STATES = ("starting", "ready", "draining")


def _gone(settings: Settings, data: dict[str, Any]) -> bool:
    """Is the run that wrote a live state gone (killed outright: SIGKILL, a dead kernel), so that
    nothing will ever write its end? Told by the owner in ``children.json`` (pid and start time: a
    reused pid is not taken for the run), else by the pid alone."""
    pid = int(data.get("pid") or 0)
    if data.get("state") not in LIVE_STATES or pid <= 0:
        return False
    owner, _ = Children(settings.state_dir / "children.json").previous()
    if int(owner.get("pid", 0)) == pid:
        return not same_process(pid, owner.get("started", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _status_command(settings: Settings) -> int:
    if RUNNING is not None:  # starting, serving, or how it ended (FAILED: why)
        print(RUNNING.live_line())
        return 0
    path = settings.state_dir / "status.json"
    if not path.exists():
        print(f"no deployment: {path} does not exist")
        return 1
    text = path.read_text()
    print(text)
    with contextlib.suppress(ValueError):
        data = json.loads(text)
        if isinstance(data, dict) and _gone(settings, data):
            print(
                f"the run that wrote this (pid {data.get('pid')}) is gone: it was killed while "
                f"{data.get('state')}; `python -m deployment stop` stops what it left running"
            )
            return 1
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
    if data.get("state") not in LIVE_STATES:  # stopped, failed, or none
        failed = data.get("state") == "failed"
        print("no running deployment" + (f" (the last one failed: {data.get('error')})" if failed else ""))
        return 1
    if _gone(settings, data):  # nobody would answer the request: stop what it left, say so
        try:  # stops each process the dead run left, and says so
            Children(settings.state_dir / "children.json").claim(print)
        except AlreadyRunning as exc:  # another run owns the folder now
            print(exc)
            return 1
        data.update(state="failed", error=f"killed while {data.get('state')} (pid {data.get('pid')} gone)")
        with contextlib.suppress(OSError):
            write_atomic(path, json.dumps(data, indent=1))
        print(f"no running deployment: the run (pid {data.get('pid')}) was killed; nothing is left running")
        return 0
    (settings.state_dir / "stop-request").touch()  # watched during the bring-up too
    print(f"asked the deployment (pid {data.get('pid')}, {data.get('state')}) to drain and stop")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):
            now = json.loads(path.read_text())
            if now.get("state") == "stopped":
                print("stopped")
                return 0
            if now.get("state") == "failed":
                print(f"stopped, after a failure: {now.get('error')}")
                return 1
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
    background = in_notebook() if settings.background == "auto" else truthy(settings.background)
    if background:
        RUNNING = dep
        dep.start_background()
        return 0
    return dep.run()
