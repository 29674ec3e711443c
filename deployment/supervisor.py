"""A small asyncio supervisor: start children in order, wait for each to be healthy, restart one
that exits or stops answering its health check (exponential backoff, reset after a stable run), and
stop them in reverse order (each with its own signal and grace period: the bridge drains on SIGTERM).

Each child's stdout and stderr go to its own log file (``<state>/logs/<name>.log``); the supervisor
reports through a ``say`` callback (the deployment script redacts secrets there). ``on_spawn`` and
``on_exit`` tell the deployment's record of children (``deployment/children.py``) about every
process as it starts and once it is gone, so a run that dies midway leaves nothing unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

Say = Callable[[str], None]
#: ``on_spawn(name, pid, argv0)`` and ``on_exit(pid)``: see deployment/children.py.
OnSpawn = Callable[[str, int, str], None]
OnExit = Callable[[int], None]


@dataclass
class ChildSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    #: GET this URL; any status below 500 (or ``health_ok``) is healthy. None: alive is healthy.
    health_url: str | None = None
    ready_timeout: float = 60.0
    cwd: Path | None = None
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 10.0
    headers: dict[str, str] = field(default_factory=dict)
    #: Run after a restart made it healthy again (e.g. load the model again).
    on_ready: Callable[[], Awaitable[None]] | None = None


class ChildFailed(RuntimeError):
    pass


class Child:
    def __init__(
        self, spec: ChildSpec, say: Say, on_spawn: OnSpawn | None = None, on_exit: OnExit | None = None
    ) -> None:
        self.spec = spec
        self.say = say
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.proc: asyncio.subprocess.Process | None = None
        self.started_at = 0.0
        self.starts = 0
        self.restarts = 0
        self.failures = 0  # consecutive failed runs, for the backoff
        self.bad_checks = 0
        self.healthy = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        spec = self.spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(spec.log_path, "ab") as log:  # noqa: ASYNC230 - a local file, written once
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} start {spec.argv[0]}\n".encode())
            log.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=spec.env,
                cwd=spec.cwd,
                start_new_session=True,  # its own process group: stopped with its children
            )
        if self.on_spawn is not None:
            self.on_spawn(spec.name, self.proc.pid, os.path.basename(spec.argv[0]))
        self.started_at = time.monotonic()
        self.starts += 1
        self.bad_checks = 0
        self.healthy = False

    async def check(self, client: httpx.AsyncClient) -> bool:
        if not self.running:
            return False
        if self.spec.health_url is None:
            return True
        try:
            r = await client.get(self.spec.health_url, headers=self.spec.headers, timeout=5.0)
            return r.status_code < 500
        except httpx.HTTPError:
            return False

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        while True:
            if await self.check(client):
                self.healthy = True
                return
            if not self.running:
                code = self.proc.returncode if self.proc else None
                raise ChildFailed(f"{self.spec.name} exited ({code}) before it was ready:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise ChildFailed(
                    f"{self.spec.name} not ready after {self.spec.ready_timeout:.0f} s:\n{self.tail()}"
                )
            await asyncio.sleep(0.1)

    def tail(self, lines: int = 20) -> str:
        try:
            text = self.spec.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    async def stop(self, sig: int | None = None, timeout: float | None = None) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is not None:  # it exited: what it left in its group goes too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if self.on_exit is not None:
                self.on_exit(proc.pid)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig or self.spec.stop_signal)
        try:
            await asyncio.wait_for(proc.wait(), timeout if timeout is not None else self.spec.stop_timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
        # whatever it left in its group (a server's workers)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        if self.on_exit is not None:
            self.on_exit(proc.pid)


class Supervisor:
    """Run children; call :meth:`start` (in order, each ready before the next), then :meth:`watch`
    until :meth:`stop`."""

    def __init__(
        self,
        say: Say,
        *,
        interval: float = 2.0,
        bad_checks: int = 3,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 60.0,
        on_spawn: OnSpawn | None = None,
        on_exit: OnExit | None = None,
    ) -> None:
        self.say = say
        self.on_spawn = on_spawn
        self.on_exit = on_exit
        self.children: list[Child] = []
        self.interval = interval
        self.max_bad_checks = bad_checks
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self._stopping = asyncio.Event()
        self._client = httpx.AsyncClient(trust_env=False)
        self._restarting: set[str] = set()

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.spec.name == name:
                return c
        raise KeyError(name)

    async def add(self, spec: ChildSpec) -> Child:
        """Start a child and wait until it is healthy."""
        child = Child(spec, self.say, self.on_spawn, self.on_exit)
        self.children.append(child)
        await child.start()
        await child.wait_ready(self._client)
        return child

    def backoff(self, child: Child) -> float:
        return float(min(self.backoff_max, self.backoff_initial * 2 ** max(0, child.failures - 1)))

    async def watch(self) -> None:
        """Health-check every child each interval; restart one that exited or failed
        ``bad_checks`` checks in a row."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            if self._stopping.is_set():
                return
            for child in list(self.children):
                if child.spec.name in self._restarting:
                    continue
                ok = await child.check(self._client)
                if ok:
                    child.bad_checks = 0
                    child.healthy = True
                    if child.failures and time.monotonic() - child.started_at > self.stable_after:
                        child.failures = 0
                    continue
                child.healthy = False
                if child.running:
                    child.bad_checks += 1
                    if child.bad_checks < self.max_bad_checks:
                        continue
                    why = f"failed {child.bad_checks} health checks in a row"
                else:
                    code = child.proc.returncode if child.proc else None
                    why = f"exited with code {code}"
                self._restarting.add(child.spec.name)
                asyncio.get_running_loop().create_task(self._restart(child, why))

    async def _restart(self, child: Child, why: str) -> None:
        try:
            if time.monotonic() - child.started_at > self.stable_after:
                child.failures = 0
            child.failures += 1
            delay = self.backoff(child)
            self.say(
                f"supervisor: {child.spec.name} {why}; restarting in {delay:g} s "
                f"(restart {child.restarts + 1}); log: {child.spec.log_path}"
            )
            await child.stop(signal.SIGKILL, 5)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            await child.start()
            child.restarts += 1
            try:
                await child.wait_ready(self._client)
                if child.spec.on_ready is not None:
                    await child.spec.on_ready()
                self.say(f"supervisor: {child.spec.name} is back (pid {child.pid})")
            except Exception as exc:  # the next check restarts it again (with a longer backoff)
                self.say(f"supervisor: {child.spec.name} did not come back: {exc}")
        finally:
            self._restarting.discard(child.spec.name)

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self, first: list[str] | None = None) -> None:
        """Stop every child: those named in ``first`` first (in that order), then the rest in
        reverse start order."""
        self._stopping.set()
        order = [self.child(n) for n in (first or []) if any(c.spec.name == n for c in self.children)]
        order += [c for c in reversed(self.children) if c not in order]
        for child in order:
            await child.stop()
        await self._client.aclose()
