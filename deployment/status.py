"""What the deployment shows: the status line, the notebook's live line, the READY banner and
``<state>/status.json`` (no secrets: every text passes the redactor).

The status line: ``open <url> | key <key> | model M | mode M (engine) | placement | Open WebUI on |
VRAM ... | session left 11h52m``; a configured relay's URL and a remote key are never shown. The READY
banner also exports what ``bridge validate`` reads (``--export-env``) into this process's
environment, so a notebook cell can run it without any setting.

``status.json``'s ``state``, in the order a run writes it: ``starting`` (from the run's start,
once no other live run owns the state dir), ``ready``, ``draining``, then ``stopped`` (a stop, the
deadline, a handover) or ``failed`` (the bring-up or the serving loop raised; ``error`` says why in
one redacted line). Each carries the run's ``pid`` and ``started_at``.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from deployment import gpus as gpumod
from deployment.session import Deadline, write_atomic
from deployment.settings import EXPORTED_RELAY, in_notebook, truthy
from deployment.stack import EMBEDDED_ROUTE, OLLAMA_ROUTE, Stack, first_line


def webui_text(st: Stack) -> str:
    if st.facts.webui:
        return "Open WebUI on"
    if st.facts.webui_error:
        return f"Open WebUI FAILED: {st.facts.webui_error}"
    return "Open WebUI off"


def status_line(st: Stack) -> str:
    f = st.facts
    left = Deadline.fmt(st.deadline.left()) if st.deadline.limited else "no limit"
    label = "session left" if st.deadline.ends_with_session or not st.deadline.limited else "run left"
    return (
        f"open {f.url_shown} | key {f.key_shown} | model {f.model} | mode {f.mode}"
        f"{' x' + str(len(f.upstreams)) if len(f.upstreams) > 1 else ''} ({f.engine}) | "
        f"{f.placement or 'placement unknown'} | {webui_text(st)} | "
        f"VRAM {gpumod.describe_vram(st.gpus)} | {label} {left}"
        + (f" | next session: {f.handover}" if f.handover else "")
    )


def failure(st: Stack) -> str:
    """Why the run failed, in one redacted line ("" when it did not)."""
    if st.failed is None:
        return ""
    return st.redact(first_line(str(st.failed)) or type(st.failed).__name__)


def live_line(st: Stack) -> str:
    """The one line a notebook shows and updates in place: the bring-up's step, then the status,
    then how it ended."""
    if st.finished.is_set():
        state = "FAILED: " + failure(st) if st.failed else "stopped"
        why = f" ({st.stop_reason})" if st.stop_reason and not st.failed else ""
        return st.redact(f"{state}{why} | {status_line(st) if st.ready.is_set() else st.phase}")
    if not st.ready.is_set():
        return st.redact(f"starting ({time.monotonic() - st.t0:.0f} s): {st.phase}")
    prefix = "DRAINING" if st.stop_reason else "SERVING"
    return st.redact(f"{prefix} {time.strftime('%H:%M:%S')} | {status_line(st)}")


def session_end_text(st: Stack) -> str:
    if not st.deadline.hours:
        return "never (no session limit)"
    end = time.strftime("%H:%M:%S", time.localtime(st.deadline.session_end))
    return f"at {end} ({st.deadline.hours:g} h after {st.session_source})"


def banner(st: Stack) -> None:
    """``READY in N s: <status line>`` and how to reach the service; then, with ``--export-env``,
    what `bridge validate` reads into this process's environment."""
    f = st.facts
    u = f.url_shown
    api = f"{u}r/{OLLAMA_ROUTE}/api/chat (Ollama API), {u}r/{OLLAMA_ROUTE}/v1 (OpenAI API)"
    write_status(st, state="ready")  # before READY: whoever reads the line finds the file
    st.say(f"READY in {st.facts.timings.get('ready', 0):.1f} s: " + status_line(st))
    st.say(
        f"  browser: {u}{'' if f.webui else ' (no Open WebUI: the API only)'}"
        f"{' (log in with the key, then Open WebUI)' if f.webui else ''}"
    )
    st.say(f"  API:     {api} with 'Authorization: Bearer <key>'")
    st.say(f"  timings: {json.dumps(st.facts.timings)}")
    if st.deadline.limited:
        end = time.strftime("%H:%M:%S", time.localtime(st.deadline.end))
        why = "--serve-minutes" if not st.deadline.ends_with_session else "the session's end"
        st.say(f"  serving until {end} ({why}), draining {st.s.drain_minutes:g} min before")
    if in_notebook() if st.s.export_env == "auto" else truthy(st.s.export_env):
        exported = validate_env(st)
        if os.environ.get("BRIDGE_RELAY"):  # the user's own setting: `bridge validate` reads it too
            del exported["BRIDGE_RELAY"]
        else:  # ours: a later run in this kernel must not take it for the user's (parse_settings)
            os.environ[EXPORTED_RELAY] = exported["BRIDGE_RELAY"]
        os.environ.update(exported)


def validate_env(st: Stack) -> dict[str, str]:
    """What `bridge validate` reads, for this deployment (the key only when we know it)."""
    route = OLLAMA_ROUTE if st.facts.engine.startswith("Ollama") else EMBEDDED_ROUTE
    env = {
        "BRIDGE_RELAY": st.facts.url.rstrip("/"),
        "BRIDGE_MODEL": st.facts.model,
        "BRIDGE_VALIDATE_ROUTE": route,
        "BRIDGE_API": "ollama" if route == OLLAMA_ROUTE else "openai",
        "BRIDGE_GPU_MODE": st.facts.mode,
        "BRIDGE_METRICS_DIR": str(st.s.state_dir / "metrics"),
    }
    key = st.key or st.s.key
    if key:
        env["BRIDGE_KEY"] = key
    return env


def write_status(st: Stack, state: str) -> None:
    """``<state>/status.json``: what ``python -m deployment status`` shows and ``stop`` watches;
    ``state`` is ``starting``, ``ready``, ``draining``, ``stopped`` or ``failed`` (the module's
    docstring)."""
    data = {
        "state": state,
        "error": failure(st),
        "pid": os.getpid(),
        "started_at": st.run_started,
        "time": time.time(),
        "url": st.facts.url_shown,
        "model": st.facts.model,
        "mode": st.facts.mode,
        "engine": st.facts.engine,
        "decision": st.facts.decision,
        "placement": st.facts.placement,
        "upstreams": st.facts.upstreams,
        "local_endpoint": st.facts.local_endpoint,
        "webui": st.facts.webui,
        "webui_error": st.facts.webui_error,
        "handover": st.facts.handover,
        "timings": st.facts.timings,
        "session_start": st.deadline.start,
        "session_start_from": st.session_source,
        "session_end": st.deadline.session_end if st.deadline.hours else None,
        "run_end": st.deadline.end if st.deadline.limited else None,
        "stop_reason": st.stop_reason,
        "ready_at": st.ready_at,
        "draining_at": st.draining_at,
        "children": {
            c.spec.name: {
                "pid": c.pid,
                "restarts": c.restarts,
                "healthy": c.healthy,
                "state": c.state,
                "exe": os.path.basename(c.spec.argv[0]),
            }
            for c in (st.sup.children if st.sup else [])
        },
        "validate_env": {k: v for k, v in validate_env(st).items() if k != "BRIDGE_KEY"},
    }
    with contextlib.suppress(OSError):
        write_atomic(st.s.state_dir / "status.json", st.redact(json.dumps(data, indent=1)))
