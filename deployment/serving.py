"""From READY to the drain: the status file, the deadline's warnings, the next session, the
validation run, and a stop asked for from outside.

The run ends at the session's end (``--session-hours``, counted from the container's start), or
``--serve-minutes`` after READY: warnings at ``--warn-minutes`` before; the bridge drains
``--drain-minutes`` before the session's end (ahead of Kaggle's hard stop), or at the
``--serve-minutes`` end itself (the relay then holds new requests for the next bridge). With
``--next-kernel`` (or ``--next-session-cmd``) the next session starts ``--next-minutes`` before the
session's end (its own time, whatever the warnings are), and this one drains as soon as the relay
counts one more bridge; if none comes, it serves to its end and says so. ``python -m deployment
stop`` asks through ``<state>/stop-request`` (:func:`stop_requested`, watched during the bring-up
too).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import Any

import httpx

from deployment import gpus as gpumod
from deployment import handover, relay, status
from deployment.children import Cancelled, child_env, run_recorded, tail
from deployment.session import Deadline
from deployment.settings import code_root
from deployment.stack import Stack, first_line

#: Seconds a GPU query (NVML, else nvidia-smi) may take before the GPUs are no longer queried.
GPU_QUERY_TIMEOUT = 20.0
#: What ``python -m deployment stop`` gives as the reason to stop.
STOP_COMMAND = "python -m deployment stop"


def stop_requested(st: Stack) -> bool:
    """``python -m deployment stop`` asked this run to stop: ``<state>/stop-request``, made since
    the run began. The file is consumed; one left by an earlier run is removed and does not count."""
    path = st.s.state_dir / "stop-request"
    try:
        made = path.stat().st_mtime
    except OSError:
        return False
    with contextlib.suppress(OSError):
        path.unlink()
    return made >= st.run_started


async def until_the_end(st: Stack, stop: asyncio.Event) -> None:
    """Every few seconds until the end (``stop`` set, or a reason to drain: then ``st.stop_reason``
    says why): status.json, the deadline's warnings, the next session, a stop asked for from outside
    (``python -m deployment stop``), the validation run."""
    last_status = time.monotonic()
    last_touch = 0.0
    summary: dict[str, Any] = {}
    hours_failed = False
    #: GPUs to query: those found at the start (one empty or stalled answer later stops nothing).
    query_gpus = bool(st.gpus)
    handing_over: asyncio.Task[bool] | None = None
    handover_tried = False
    validating = asyncio.create_task(_validate(st)) if st.s.validate else None
    try:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), min(st.s.health_interval, 5.0))
            if stop.is_set():
                return
            if stop_requested(st):
                st.stop_reason = st.stop_reason or STOP_COMMAND
                return
            if query_gpus:
                try:
                    # NVML has no timeout of its own: a wedged GPU must not hold the deadline.
                    st.gpus = await asyncio.wait_for(asyncio.to_thread(gpumod.query), GPU_QUERY_TIMEOUT)
                except TimeoutError:
                    query_gpus = False
                    st.say(
                        f"WARNING: the GPU query did not answer in {GPU_QUERY_TIMEOUT:g} s: GPU figures "
                        "are no longer updated (the GPU may be wedged)"
                    )
            if time.monotonic() - last_touch >= 60 or not summary:
                last_touch = time.monotonic()
                try:
                    summary = await asyncio.to_thread(st.hours.touch)
                except Exception as exc:  # a read-only or full disk, a damaged file: serving goes on
                    summary = {"session_hours_7d": "?", "device_hours_7d": "?"}
                    if not hours_failed:
                        hours_failed = True
                        st.say(f"WARNING: GPU hours not recorded in {st.hours.path}: {exc!r}")
            status.write_status(st, state="ready")
            if st.deadline.due_warnings():  # several at once (a short run): one message
                why = "the session's end" if st.deadline.ends_with_session else "--serve-minutes"
                st.say(
                    f"WARNING: this run ends in {Deadline.fmt(st.deadline.left())} ({why}); the "
                    f"bridge drains {st.s.drain_minutes:g} min before. "
                    f"GPU hours (7 days): {summary['session_hours_7d']}"
                )
            # At its own time (--next-minutes), not at a warning's: with no warnings it starts too.
            if not handover_tried and _wants_handover(st) and st.deadline.handover_due():
                handover_tried = True  # once: a failed push is not pushed again
                handing_over = asyncio.create_task(_hand_over(st))
            if handing_over is not None and handing_over.done():
                task, handing_over = handing_over, None  # what it says, it says once
                if _handed_over(st, task):
                    st.stop_reason = "handed over to the next session"
                    return
            if st.deadline.must_drain():
                if handing_over is not None:  # started, still waiting for its bridge
                    handing_over.cancel()
                    st.facts.handover = "did not connect"
                    st.say(
                        "the next session's bridge has not connected to the relay: this session "
                        "served to its end"
                    )
                elif handover_tried:
                    st.say(
                        f"the next session was not started ({st.facts.handover}): this session "
                        "served to its end"
                    )
                st.stop_reason = "the session's end" if st.deadline.ends_with_session else "--serve-minutes"
                st.say(
                    f"{st.stop_reason}: draining the bridge so the relay holds new requests "
                    "for the next bridge"
                )
                return
            if time.monotonic() - last_status >= st.s.status_interval:
                last_status = time.monotonic()
                st.say(f"status: {status.status_line(st)} | GPU hours 7d {summary['session_hours_7d']}")
    finally:
        for pending in (handing_over, validating):
            if pending is not None and not pending.done():
                pending.cancel()
                with contextlib.suppress(BaseException):
                    await pending


# ---------------------------------------------------------------------------------------- next session
def _handed_over(st: Stack, task: asyncio.Task[bool]) -> bool:
    if task.cancelled():
        return False
    exc = task.exception()
    if exc is not None:  # a bug or an odd answer: this session serves on
        st.facts.handover = f"FAILED: {first_line(str(exc))}"
        st.say(f"next session: FAILED: {exc!r}; this session serves to its end")
        return False
    return task.result()


def _wants_handover(st: Stack) -> bool:
    return bool(st.s.next_kernel or st.s.next_session_cmd)


async def _hand_over(st: Stack) -> bool:
    """Start the next session (push the notebook, or DEPLOY_NEXT_SESSION_CMD), then wait for its
    bridge on the relay. True once it is connected: time to drain."""
    s = st.s
    if not s.relay:
        st.facts.handover = "needs BRIDGE_RELAY"
        st.say(
            "next session: not started: a local relay ends with this session (set BRIDGE_RELAY to a "
            "relay you run)"
        )
        return False
    nodes_before = 0
    async with httpx.AsyncClient(timeout=15) as client:
        for _ in range(3):
            with contextlib.suppress(httpx.HTTPError, ValueError):
                nodes_before = int((await relay.health(st, client)).get("nodes", 1))
                break
        # This session's bridge counts even when the relay could not be asked, or asked while that
        # bridge reconnected: else the next health check, counting this one only, would look like
        # the next session's bridge had come, and this one would drain with nobody to take over.
        nodes_before = max(nodes_before, 1)
        if s.next_session_cmd:
            ok, why = await _next_session_cmd(st)
        else:
            st.say(f"next session: pushing {s.next_kernel} with the Kaggle CLI ({s.next_accelerator})")
            result = await asyncio.to_thread(
                handover.push_next_session,
                s.next_kernel,
                s.state_dir,
                st.say,
                st.redact,
                accelerator=s.next_accelerator,
                children=st.children,
                cancel=st.cancel,
            )
            ok, why = result.ok, result.reason
        if not ok:
            st.facts.handover = f"FAILED: {why}"
            st.say(f"next session: FAILED: {why}; this session serves to its end")
            return False
        st.facts.handover = "started, waiting for its bridge"
        st.say(f"next session: {why}; waiting for its bridge on the relay, then this one drains")
        while True:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                nodes = int((await relay.health(st, client)).get("nodes", 0))
                if nodes > nodes_before:
                    st.facts.handover = "connected"
                    st.say(
                        f"next session: its bridge is connected ({nodes} bridges on the relay): "
                        "draining this one"
                    )
                    return True
            await asyncio.sleep(5 if st.s.health_interval >= 5 else 0.5)


async def _next_session_cmd(st: Stack) -> tuple[bool, str]:
    log = st.logs / "next-session.log"
    code = await asyncio.to_thread(
        run_recorded,
        "next-session",
        ["/bin/sh", "-c", st.s.next_session_cmd],
        log=log,
        children=st.children,
        cancel=st.cancel,
        timeout=600,
    )
    for line in tail(log, 12).splitlines()[1:]:
        st.say(f"next-session command: {line}")
    st.say(f"next-session command exited {code}")
    return code == 0, f"DEPLOY_NEXT_SESSION_CMD exited {code}"


# ---------------------------------------------------------------------------------------- validation
async def _validate(st: Stack) -> None:
    """`bridge validate` through the relay, while serving; the report goes to the reports dir."""
    try:
        await _run_validation(st)
    except (asyncio.CancelledError, Cancelled):
        raise
    except Exception as exc:  # the service goes on
        st.say(f"validation: FAILED: {exc!r}")


async def _run_validation(st: Stack) -> None:
    env = status.validate_env(st)
    if "BRIDGE_KEY" not in env:
        st.say("validation: skipped: it needs a client key of the relay (BRIDGE_KEY)")
        return
    out = st.s.reports_dir / f"validation-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = [
        sys.executable,
        "-m",
        "bridge.cli",
        "validate",
        "--out",
        str(out),
        *st.s.validate_args.split(),
    ]
    st.say(f"validation: running `bridge validate` through the relay into {out}")
    log = st.logs / "validate.log"
    code = await asyncio.to_thread(
        run_recorded,
        "validate",
        argv,
        log=log,
        children=st.children,
        cancel=st.cancel,
        env=child_env(**env),
        cwd=code_root(),
    )
    for line in tail(log, 4).splitlines():
        if line.startswith(("validation ", "report:")):
            st.say(line)
    if (out / "report.md").exists():
        st.reports.append(out)
    st.say(f"validation: {'done' if code == 0 else f'FAILED (exit {code}), log {log}'}")
