"""Real processes on loopback for the tests: upstream servers, relays and bridges.

Each process's stdout and stderr are read by a thread into a list of lines; a test waits for a line
(``wait_for``) instead of sleeping, and can search the whole log afterwards (e.g. for secrets).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import connect

ROOT = Path(__file__).resolve().parent.parent
NODE_TOKEN = "test-node-token-0123456789abcdef"
API_KEY = "bk_test0001_sekrit-client-key-for-tests-only"


class Proc:
    """A child process whose output lines are collected and can be waited for."""

    def __init__(self, args: Sequence[str], name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = list(args)
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._cond = threading.Condition()
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.popen = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=full_env,
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """Block until a line (from index ``start`` on) matches ``pattern``; return the match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = rx.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                if self.popen.poll() is not None and not self._thread.is_alive():
                    raise AssertionError(
                        f"{self.name} exited ({self.popen.returncode}) before {pattern!r}:\n{self.output}"
                    )
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"{self.name}: no line matching {pattern!r} in {timeout}s:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.5))

    def mark(self) -> int:
        """An index into the output: ``wait_for(..., start=mark)`` sees only lines after it."""
        with self._cond:
            return len(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.popen.wait(timeout)
        self._thread.join(5)
        return code

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.popen.wait(10)
        self._thread.join(5)


def until(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "condition") -> None:
    """Wait for a state another process reaches (polled: there is no event to wait on across
    processes here). Fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def release(upstream: str, gate: str) -> None:
    """Let a gated stream of the stand-in upstream (tests/upstreams.py, ``gate=``) write its next
    item: a test reads each item through the relay before it releases the next, so an item held
    back on the way shows as a read that never completes, however loaded the machine is."""
    httpx.post(f"{upstream}/gate/{gate}", timeout=10).raise_for_status()


async def gated_ticks(url: str, upstream: str, gate: str, headers: dict[str, str]) -> GatedTicks:
    """The ``i`` of every message of the upstream's gated ``/ws/ticks`` WebSocket at ``url`` (its
    query names ``gate``): each next message is released only once the client has this one
    (:func:`release`), so a message held back on the way is a receive that times out (20 s)."""
    seen: list[int] = []
    async with connect(url, additional_headers=headers) as ws:
        while True:
            try:
                message = await asyncio.wait_for(ws.recv(), 20)
            except websockets.ConnectionClosedOK:
                break
            seen.append(json.loads(message)["i"])
            await asyncio.to_thread(release, upstream, gate)
    return GatedTicks(seen, ws.close_code, ws.close_reason)


@dataclass(frozen=True)
class GatedTicks:
    seen: list[int]
    close_code: int | None
    close_reason: str | None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bridge_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bridge.cli", *args]


def start_upstream(token_delay: float = 0.05, model: str = "") -> tuple[Proc, str]:
    cmd = [sys.executable, "-m", "tests.upstreams", "--port", "0", "--token-delay", str(token_delay)]
    proc = Proc([*cmd, "--model", model] if model else cmd, "upstream")
    port = proc.wait_for(r"^READY (\d+)").group(1)
    return proc, f"http://127.0.0.1:{port}"


class Relay:
    def __init__(self, data_dir: Path, *extra: str, port: int = 0, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra = extra
        self.env = env
        self.port = port
        self.bridge_pid = 0  # the pid of the bridge the test connected, where one needs it
        self.proc = self._start()

    def _start(self) -> Proc:
        proc = Proc(
            bridge_cmd(
                "relay",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                "--node-token",
                NODE_TOKEN,
                "--api-keys",
                API_KEY,
                "--log-level",
                "debug",
                *self.extra,
            ),
            "relay",
            self.env,
        )
        self.port = int(proc.wait_for(r"relay listening on http://127\.0\.0\.1:(\d+)").group(1))
        return proc

    def restart(self) -> None:
        self.proc.stop()
        self.proc = self._start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def health(self) -> dict[str, Any]:
        r = httpx.get(self.url + "/_relay/health", timeout=10)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, **{"timeout": 30, **kw}
        )

    def aclient(self, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, **{"timeout": 30, **kw}
        )


class Bridge:
    def __init__(self, relay: Relay, routes: dict[str, str], *extra: str, wait: bool = True) -> None:
        self.relay = relay
        self.routes = routes
        self.extra = extra
        mark = relay.proc.mark()
        self.proc = Proc(
            bridge_cmd(
                "connect",
                "--relay",
                relay.ws_url,
                "--node-token",
                NODE_TOKEN,
                "--log-level",
                "debug",
                "--backoff-max",
                "1",
                *[a for name, url in routes.items() for a in ("--route", f"{name}={url}")],
                *extra,
            ),
            "bridge",
        )
        if wait:
            self.wait_connected(mark)

    def wait_connected(self, relay_mark: int, timeout: float = 30.0) -> None:
        self.relay.proc.wait_for(r"bridge \S+ connected from", timeout, start=relay_mark)

    def local_port(self) -> int:
        """The port of the bridge's local endpoint (``--listen 127.0.0.1:0``), read from its log."""
        return int(self.proc.wait_for(r"local endpoint on http://127\.0\.0\.1:(\d+)/").group(1))

    def stop(self) -> None:
        self.proc.stop()


def stop_all(procs: Iterator[Proc | Relay | Bridge] | list[Any]) -> None:
    for p in procs:
        (p.proc if isinstance(p, Relay | Bridge) else p).stop()
