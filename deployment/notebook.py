"""The notebook's one cell: bring the stack up, then keep serving until the session ends.

``serve(SETTINGS)`` (notebooks/kaggle_ollama_webui.ipynb) runs the whole deployment inside the cell
and returns only when it has stopped:

- One live status line, updated in place (an IPython display handle: a saved notebook keeps only
  its last text, not one line per update): the bring-up's step and progress, then what is served
  where, the GPU or CPU placement, Open WebUI's state, VRAM and the time left; at the end, how it
  ended. The log lines above it are the bring-up's steps and the rare events after READY
  (restarts, warnings, the next session), never a periodic flood.
- It keeps serving to the end of the run: the session's end (12 h after the container started, the
  bridge draining 5 minutes before), ``serve_minutes`` after READY, or the handover to the next
  session. In a batch run ("Save & Run All", a pushed version) the session lasts as long as this
  cell runs, so it lasts to the end.
- Interrupt (the stop button) drains the bridge and stops everything, during the bring-up too; a
  second interrupt kills what is left at once.

Settings: the cell's dictionary holds the notebook's defaults (names as the flags', e.g.
``gpu_mode``); a ``DEPLOY_*``/``BRIDGE_*`` variable in the environment wins over them, as it wins
over every default. Secrets never go in the dictionary: Kaggle Secrets (or the environment).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from deployment import cli
from deployment.orchestration import Deployment
from deployment.settings import FLAGS, SECRET_SETTINGS, parse_settings

#: Seconds between updates of the live line.
REFRESH = 2.0


def settings_env(settings: Mapping[str, Any]) -> dict[str, str]:
    """The cell's settings as the environment variables of the same flags."""
    env = {}
    for name, value in settings.items():
        if name in SECRET_SETTINGS or name == "relay":
            raise ValueError(f"{name!r} is a secret: add it in Add-ons > Secrets, not in the notebook")
        if name not in FLAGS:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(FLAGS))}")
        if value is None:
            continue
        env[FLAGS[name][0]] = ("1" if value else "0") if isinstance(value, bool) else str(value)
    return env


class _Phase(io.TextIOBase):
    """A file for progress bars that feeds the live line instead of printing (``\\r`` redraws)."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.sink = sink

    def write(self, text: str) -> int:
        parts = [p.strip() for p in text.replace("\r", "\n").split("\n") if p.strip()]
        if parts:
            self.sink(parts[-1])
        return len(text)

    def isatty(self) -> bool:
        return True  # draw every update (into the line), not a line per 10 %


class LiveLine:
    """One line updated in place: a Jupyter display (``update_display_data``), else ``\\r`` on a
    terminal, else nothing until :meth:`done`."""

    def __init__(self) -> None:
        self.text = ""
        self._handle: Any = None
        with contextlib.suppress(ImportError):
            from IPython import get_ipython

            shell = get_ipython()
            if shell is not None and getattr(shell, "kernel", None) is not None:
                from IPython.display import display

                self._handle = display({"text/plain": "starting"}, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        self._tty = self._handle is None and sys.stdout.isatty()

    def update(self, text: str) -> None:
        if text == self.text:
            return
        self.text = text
        if self._handle is not None:
            self._handle.update({"text/plain": text}, raw=True)
        elif self._tty:
            sys.stdout.write("\r\x1b[2K" + text)
            sys.stdout.flush()

    def done(self, text: str) -> None:
        self.update(text)
        if self._handle is None:
            print(("\n" if self._tty else "") + text, flush=True)


def serve(settings: Mapping[str, Any] | None = None, **more: Any) -> Deployment:
    """Bring the stack up and serve until the run ends (see the module's docstring); returns the
    stopped deployment. ``settings``/``more``: setting name -> value, the notebook's defaults."""
    running = cli.RUNNING
    if running is not None and not running.finished.is_set():
        print("already serving in this kernel: " + running.live_line())
        return running
    env = {**settings_env({**(settings or {}), **more}), **os.environ}
    s = parse_settings([], env)
    dep = Deployment(s, out=sys.stdout)
    cli.RUNNING = dep
    live = LiveLine()

    def phase(text: str) -> None:
        dep.phase = dep.redact(text)

    dep.progress_out = _Phase(phase)  # type: ignore[assignment]  # a text file, as far as Progress cares
    shown = 0
    try:
        try:
            dep.start_thread()  # in the try: an interrupt while the thread starts stops it too
            while not dep.finished.wait(REFRESH):
                live.update(dep.live_line())
                while shown < len(dep.reports):
                    cli.show_report(dep.reports[shown])
                    shown += 1
        except KeyboardInterrupt:
            live.update(dep.redact("interrupted: draining the bridge, then stopping everything"))
            dep.stop(why="interrupted")
        except BaseException:
            # Anything else ends the cell (a failed display, a bug): the stack must not go on
            # serving without the cell that owns it (a second serve() would only say "already").
            dep.stop(why="the notebook cell failed")
            raise
    except KeyboardInterrupt:  # a second interrupt while draining: no more waiting
        dep.kill()
        dep.stop(timeout=15, why="killed")
    finally:
        while shown < len(dep.reports):
            cli.show_report(dep.reports[shown])
            shown += 1
        live.done(dep.live_line())
        with contextlib.suppress(OSError):
            _keep_summary(dep)
    if dep.failed is not None and not dep.stop_reason:  # the cell shows it failed (a version too)
        raise RuntimeError(dep.redact(f"the deployment failed: {dep.failed}")) from None
    return dep


def _keep_summary(dep: Deployment) -> None:
    """A short, redacted record of the run beside the reports (saved with a Kaggle version)."""
    path: Path = dep.s.reports_dir / "last-run.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    timings = ", ".join(f"{k} {v} s" for k, v in dep.facts.timings.items())
    path.write_text(
        dep.redact(f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n{dep.live_line()}\ntimings: {timings}\n")
    )
