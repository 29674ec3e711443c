"""The deployment's life: bring the rooms up in order, serve, drain, stop.

:class:`Deployment` is a :class:`~deployment.stack.Stack` that runs: the bridge's dependencies
(once, on a fresh kernel), the GPUs, then the relay (``relay``), Open WebUI's install in the
background (``webui``), the engine (``engines``), the bridge with its local endpoint, Open WebUI; then
READY and ``serving.until_the_end``; then the drain (the bridge first) and the stop. It runs in this
thread (a script: SIGINT/SIGTERM drain and stop, a second one kills), or in a thread of its own (the
notebook's cell, a running event loop); :meth:`Deployment.stop` works from any thread, during the
bring-up too. Every process is recorded in ``<state>/children.json`` the moment it starts
(deployment/children.py): a run that dies midway leaves nothing the next run does not stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from deployment import engines, relay, serving, status, webui
from deployment import gpus as gpumod
from deployment.children import AlreadyRunning, Cancelled, Children, child_env, run_recorded, tail
from deployment.engine import free_port
from deployment.settings import ROOT, Settings, code_root
from deployment.stack import EMBEDDED_ROUTE, OLLAMA_ROUTE, Stack, first_line
from deployment.supervisor import ChildSpec, Supervisor

#: Seconds between looks for ``<state>/stop-request`` during the bring-up.
STOP_REQUEST_POLL = 0.5


def ensure_bridge(
    say: Callable[[str], None],
    *,
    log: Path,
    children: Children | None = None,
    cancel: threading.Event | None = None,
) -> None:
    """The bridge's dependencies in this interpreter: on a fresh Kaggle kernel ``pip install`` of
    this checkout with its ``validate`` extra (the ``ollama`` and ``openai`` clients and matplotlib
    that ``bridge validate`` uses), once (Kaggle's image has pip; the install needs no ensurepip)."""
    import importlib.metadata

    try:
        importlib.metadata.version("kaggle-bridge")
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    say(f"installing the bridge's dependencies into this Python (pip install {ROOT}[validate])")
    code = run_recorded(
        "pip install kaggle-bridge",
        [sys.executable, "-m", "pip", "install", "-q", f"{ROOT}[validate]"],
        log=log,
        children=children,
        cancel=cancel,
        timeout=900,
    )
    if code != 0:
        raise RuntimeError(f"pip install {ROOT} failed (exit {code}):\n{tail(log)}")


class Deployment(Stack):
    """The whole stack. :meth:`run` blocks (a script); :meth:`start_background` returns once it is
    ready; :meth:`start_thread` returns at once (the notebook's live cell, deployment/notebook.py);
    :meth:`stop` drains and stops it, from any thread, during the bring-up too."""

    def __init__(self, settings: Settings, out: IO[str] | None = None) -> None:
        super().__init__(settings, out)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ what it shows
    def status_line(self) -> str:
        return status.status_line(self)

    def live_line(self) -> str:
        """The one line a notebook shows and updates in place (see :func:`status.live_line`)."""
        return status.live_line(self)

    def validate_env(self) -> dict[str, str]:
        """What `bridge validate` reads, for this deployment (the key only when we know it)."""
        return status.validate_env(self)

    # ------------------------------------------------------------------------------ entry points
    def run(self) -> int:
        """Run in this thread until SIGINT/SIGTERM or the session's end; 0 on a clean stop."""
        try:
            asyncio.run(self._main(signals=True))
        except Exception as exc:
            self.say(f"FAILED: {exc}")
            return 1
        return 0 if self.failed is None else 1

    def start_thread(self) -> Deployment:
        """Run the supervisor in a thread of its own (works under Jupyter's running loop, without
        nest_asyncio) and return at once; ``ready`` and ``finished`` tell how it goes."""
        self._thread = threading.Thread(target=self._thread_main, name="deploy-supervisor", daemon=True)
        self._thread.start()
        return self

    def start_background(self, timeout: float | None = None) -> Deployment:
        """:meth:`start_thread`, then wait until the stack is ready. Raises if it failed to come up;
        an interrupt or ``timeout`` stops it first."""
        self.start_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while not self.ready.wait(0.2):
                if self.finished.is_set():
                    raise RuntimeError(f"the deployment failed: {self.failed}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError("the deployment was not ready in time")
        except (KeyboardInterrupt, TimeoutError):  # the cell interrupted: take the half-started stack down
            self.stop()
            raise
        import atexit

        atexit.register(self.stop)
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main(signals=False))
        except BaseException as exc:
            self.failed = self.failed or exc
            self.say(f"FAILED: {exc}")
        finally:
            self.finished.set()

    def request_stop(self, why: str = "") -> None:
        """Ask for a drain and a stop (from any thread) without waiting."""
        self.stop_reason = self.stop_reason or why
        self.cancel.set()
        loop, ev = self._loop, self._stop
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def stop(self, timeout: float | None = None, why: str = "") -> None:
        """Drain the bridge and stop every child (from any thread); waits until done."""
        self.request_stop(why)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.s.drain_timeout + 60)

    def kill(self) -> None:
        """No drain: every recorded process now (a second interrupt)."""
        self.request_stop("killed")
        self.children.kill_all()

    # ------------------------------------------------------------------------------ the stack
    async def _main(self, *, signals: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        if self.cancel.is_set():  # stopped before the thread got here
            self._stop.set()
        if signals:
            self._install_signals()
        sup = self.sup = Supervisor(
            self.say,
            interval=self.s.health_interval,
            on_spawn=self.children.add,
            on_exit=self.children.remove,
        )
        try:
            self.s.state_dir.mkdir(parents=True, exist_ok=True)
            self.children.claim(self.say)
            # The state dir is this run's now (claim() refuses a live owner's): from here on its
            # status.json says so, never a previous (killed) run's "ready".
            status.write_status(self, state="starting")
            bring_up = asyncio.create_task(self._bring_up(sup))
            stopped = asyncio.create_task(self._stop.wait())
            asked = asyncio.create_task(self._watch_stop_request(self._stop))
            await asyncio.wait({bring_up, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            asked.cancel()
            if self._stop.is_set() or self.cancel.is_set():  # a stop asked for, whatever the bring-up did
                self.say("stopping during the bring-up: " + (self.stop_reason or "asked to"))
                self.cancel.set()
                bring_up.cancel()
                with contextlib.suppress(BaseException):  # cancelled, or given up on: we stop anyway
                    await bring_up
                return
            bring_up.result()  # raises what failed
            self.mark("ready")
            self.ready_at = time.time()
            if self.s.serve_minutes > 0:
                self.deadline.stop_at = time.time() + self.s.serve_minutes * 60
            status.banner(self)
            self.ready.set()
            watch = asyncio.create_task(sup.watch())
            try:
                await serving.until_the_end(self, self._stop)
            finally:
                sup.request_stop()
                await watch
        except AlreadyRunning as exc:
            self.failed = exc
            raise
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError | Cancelled):
                self.failed = exc
            raise
        finally:
            self.cancel.set()
            if not isinstance(self.failed, AlreadyRunning):
                self.draining_at = time.time()
                status.write_status(self, state="draining")
                self.say("stopping: draining the bridge, then the rest")
                try:
                    await sup.stop(first=["bridge"])
                finally:
                    self.children.kill_all()
                if why := self.children.write_error:
                    self.say(f"warning: the record of running processes was not saved: {why}")
                with contextlib.suppress(Exception):
                    self.hours.touch()
                # failed: the bring-up or the serving loop raised (a stop asked for is no failure)
                status.write_status(self, state="stopped" if self.failed is None else "failed")
                self.say("stopped" + (f" ({self.stop_reason})" if self.stop_reason else ""))

    async def _watch_stop_request(self, stop: asyncio.Event) -> None:
        """During the bring-up: ``python -m deployment stop`` (``serving.until_the_end`` watches
        it from READY on); until ``stop``."""
        while not serving.stop_requested(self):
            with contextlib.suppress(TimeoutError):  # a file to look at, no event to wait on
                await asyncio.wait_for(stop.wait(), STOP_REQUEST_POLL)
            if stop.is_set():
                return
        self.request_stop(serving.STOP_COMMAND)

    def _install_signals(self) -> None:
        assert self._loop is not None and self._stop is not None
        count = 0

        def on_signal() -> None:
            nonlocal count
            count += 1
            if count == 1:
                self.request_stop("signal")
            else:
                self.children.kill_all()
                os._exit(1)

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                self._loop.add_signal_handler(sig, on_signal)

    async def _bring_up(self, sup: Supervisor) -> None:
        s = self.s
        await asyncio.to_thread(
            ensure_bridge, self.say, log=self.logs / "install.log", children=self.children, cancel=self.cancel
        )
        self.gpus = await asyncio.to_thread(gpumod.query)
        self.hours.gpus = [g.name for g in self.gpus]
        mode = s.mode
        if mode == "auto":
            mode = "ollama" if self.gpus and not s.model_file else "embedded"
            self.say(
                f"mode auto: {mode} ({len(self.gpus)} GPU(s){', a model file given' if s.model_file else ''})"
            )
        self.facts.mode = mode
        self.say(
            f"state in {s.state_dir}; logs in {self.logs}; reports in {s.reports_dir}; "
            f"{gpumod.describe_vram(self.gpus)}; session ends {status.session_end_text(self)}"
        )

        # 1. the relay: ours (local), the configured one, or one deployed on Cloudflare; a local
        # relay's root is Open WebUI when it runs, else the engine's API
        want_webui = webui.wanted(self)
        default_route = "webui" if want_webui else (OLLAMA_ROUTE if mode == "ollama" else EMBEDDED_ROUTE)
        relay_ws = await relay.start(self, sup, default_route)
        self.mark("relay")

        # 2. Open WebUI's install runs while the engine comes up (minutes on a fresh machine); the
        # API does not wait for it, and a failed install leaves the API up and says why
        webui_exe_task = asyncio.create_task(webui.executable_or_none(self, mode))

        # 3. the engine: Ollama servers or the embedded llama.cpp
        try:
            if mode == "ollama":
                route, urls = OLLAMA_ROUTE, await engines.start_ollama(self, sup)
            else:
                route, urls = EMBEDDED_ROUTE, [await engines.start_embedded(self, sup)]
        except BaseException:
            webui_exe_task.cancel()
            with contextlib.suppress(BaseException):
                await webui_exe_task
            raise
        self.mark("engine")
        self.facts.upstreams = urls

        # 4. the bridge, with its local endpoint for Open WebUI (whose route answers 502 until it is up)
        listen_port = s.listen_port or free_port()
        webui_port = (s.webui_port or free_port()) if want_webui else 0
        local = f"http://127.0.0.1:{listen_port}"
        self.facts.local_endpoint = local
        routes = [f"{route}={','.join(urls)}"]
        if route == EMBEDDED_ROUTE:  # Ollama's REST API, served by the bridge in front of the engine
            routes.append(f"{OLLAMA_ROUTE}=openai+{','.join(urls)}")
        if want_webui:
            routes.append(f"webui=http://127.0.0.1:{webui_port}")
        argv = [
            sys.executable,
            "-m",
            "bridge.cli",
            "connect",
            "--relay",
            relay_ws,
            "--listen",
            f"127.0.0.1:{listen_port}",
            "--default-route",
            route,
            "--metrics-dir",
            str(s.state_dir / "metrics"),
            "--gpu-mode",
            self.facts.mode,
            "--drain-timeout",
            str(s.drain_timeout),
            "--log-level",
            "info",
        ]
        for r in routes:
            argv += ["--route", r]
        if s.node_name:
            argv += ["--node-name", s.node_name]
        await sup.add(
            ChildSpec(
                "bridge",
                argv,
                child_env(BRIDGE_NODE_TOKEN=self.node_token),
                self.logs / "bridge.log",
                health_url=local + "/_bridge/metrics",
                ready_timeout=60,
                stop_signal=signal.SIGTERM,
                stop_timeout=s.drain_timeout + 10,
                cwd=code_root(),
            )
        )
        await relay.wait_node_connected(self)
        self.mark("bridge")

        # 5. Open WebUI, talking to the engine through the bridge's local endpoint
        if not webui_exe_task.done():
            self.say("the API is up (through the relay); Open WebUI is still installing")
        webui_exe = await webui_exe_task
        if webui_exe and want_webui:
            try:
                await webui.start(self, sup, webui_exe, webui_port, route, local)
                self.mark("webui")
            except Exception as exc:  # the API stays up without it
                self.facts.webui_error = first_line(str(exc))
                self.say(f"Open WebUI FAILED: {exc}")
                with contextlib.suppress(KeyError):
                    child = sup.child("webui")
                    await child.stop()
                    sup.children.remove(child)
