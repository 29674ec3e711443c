"""A small asyncio supervisor: start children in order, wait for each to be healthy, restart one
that exits or hangs (exponential backoff, reset after a stable run), and stop them in reverse order
(each with its own signal and grace period: the bridge drains on SIGTERM).

Busy is not dead. A health check that gets no answer in time is not enough to restart a child: an
engine that serves one request at a time may queue the probe behind a long prefill (llama-cpp-python's
server does, for every endpoint that touches the model), and a restart would kill the work in flight
and everything queued behind it. So when a probe goes unanswered the supervisor looks at the child's
processes (``/proc``: its process group): if they used CPU since the previous check (at least
``BUSY_CPU_SHARE`` of the time) and none is stopped, the child is busy, the check does not count, and
the log says so once; if they used none, or one is stopped (SIGSTOP, state ``T``), the check counts,
and ``bad_checks`` of them in a row restart it as hung. An answer with a status of 500 or more (the
embedded engine's ``/health`` says 503 when it holds a request but makes no progress) always counts.
Without ``/proc`` every unanswered probe counts, as before.

Each child's stdout and stderr go to its own log file (``<state>/logs/<name>.log``); the supervisor
reports through a ``say`` callback (the deployment script redacts secrets there). ``on_spawn`` and
``on_exit`` tell the deployment's record of children (``deployment/children.py``) about every
process as it starts and once it is gone, so a run that dies midway leaves nothing unrecorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
    #: Seconds a health check may take before it counts as unanswered.
    health_timeout: float = 5.0


class ChildFailed(RuntimeError):
    pass


#: An unanswered child is busy when its processes used at least this share of one core since the
#: previous check (a stopped or deadlocked process uses none; a busy one most of a core, still well
#: above this on a machine shared by several such processes).
BUSY_CPU_SHARE = 0.05
#: Seconds :meth:`Supervisor.stop` waits for restarts under way to end (a health check or a
#: ready callback in progress) after it stopped every child.
RESTART_STOP_TIMEOUT = 30.0


@dataclass
class Probe:
    """One health check: ``ok``; else ``answered`` (an error status) or not, and why."""

    ok: bool
    answered: bool = True
    why: str = ""


@dataclass
class Activity:
    """What ``/proc`` says about a process group: CPU seconds used so far and stopped members."""

    cpu: float
    stopped: list[int]


def group_activity(pgid: int) -> Activity | None:
    """CPU time (user + system) of every process in group ``pgid`` and those stopped (state T or
    t); None without ``/proc`` or when no process of the group is left."""
    try:
        tick = 1.0 / os.sysconf("SC_CLK_TCK")
        pids = [p for p in os.listdir("/proc") if p.isdigit()]
    except (OSError, ValueError, AttributeError):
        return None
    cpu, stopped, found = 0, [], False
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state is field 3
        if len(rest) < 13 or int(rest[2]) != pgid:
            continue
        found = True
        cpu += int(rest[11]) + int(rest[12])  # utime, stime: fields 14 and 15
        if rest[0] in ("T", "t"):
            stopped.append(int(pid))
    return Activity(cpu * tick, stopped) if found else None


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
        #: ``starting``, ``healthy``, ``busy`` (working, its probe unanswered), ``unhealthy``,
        #: ``hung`` or ``exited`` (about to be restarted); ``state_detail`` says why.
        self.state = "starting"
        self.state_detail = ""
        self.busy_since = 0.0
        self._seen: tuple[float, float] | None = None  # (when, CPU seconds) at the previous check

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
        self.state, self.state_detail, self._seen = "starting", "", None

    async def probe(self, client: httpx.AsyncClient) -> Probe:
        if not self.running:
            return Probe(False, False, "not running")
        if self.spec.health_url is None:
            return Probe(True)
        try:
            r = await client.get(
                self.spec.health_url, headers=self.spec.headers, timeout=self.spec.health_timeout
            )
        except httpx.TimeoutException:
            return Probe(False, False, f"no answer in {self.spec.health_timeout:g} s")
        except httpx.HTTPError as exc:  # refused, reset: nothing listens
            return Probe(False, True, f"{type(exc).__name__}: {exc}")
        if r.status_code < 500:
            return Probe(True)
        return Probe(False, True, f"answered {r.status_code}: {r.text[:200]}")

    async def check(self, client: httpx.AsyncClient) -> bool:
        return (await self.probe(client)).ok

    def activity(self) -> tuple[float | None, list[int]]:
        """(share of one core its processes used since the previous call or None, stopped pids)."""
        if self.proc is None:
            return None, []
        act = group_activity(self.proc.pid)
        if act is None:
            return None, []
        now = time.monotonic()
        seen, self._seen = self._seen, (now, act.cpu)
        if seen is None or now <= seen[0]:
            return None, act.stopped
        return max(0.0, act.cpu - seen[1]) / (now - seen[0]), act.stopped

    async def wait_ready(self, client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + self.spec.ready_timeout
        while True:
            if await self.check(client):
                self.healthy = True
                self.state, self.state_detail = "healthy", ""
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
        #: Restarts under way, by child name: held (the loop keeps only a weak reference to a
        #: task), one per child, and awaited by :meth:`stop`, so that none starts a process after it.
        self._restarts: dict[str, asyncio.Task[None]] = {}

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
                if child.spec.name in self._restarts:
                    continue
                probe = await child.probe(self._client)
                if self._stopping.is_set():  # the stop came during the probe: it stops the child
                    return
                why = self._judge(child, probe)
                if why:
                    name = child.spec.name
                    task = asyncio.get_running_loop().create_task(self._restart(child, why))
                    self._restarts[name] = task
                    task.add_done_callback(functools.partial(self._restart_ended, name))

    def _judge(self, child: Child, probe: Probe) -> str:
        """Update the child's state from one probe; return why it must be restarted ("" if not)."""
        name = child.spec.name
        share, stopped = child.activity()
        if probe.ok:
            if child.state == "busy":
                self.say(
                    f"supervisor: {name} answers its health check again "
                    f"(it was busy for {time.monotonic() - child.busy_since:.0f} s)"
                )
            child.bad_checks = 0
            child.healthy = True
            child.state, child.state_detail = "healthy", ""
            if child.failures and time.monotonic() - child.started_at > self.stable_after:
                child.failures = 0
            return ""
        child.healthy = False
        if not child.running:
            code = child.proc.returncode if child.proc else None
            child.state, child.state_detail = "exited", f"code {code}"
            return f"exited with code {code}"
        if not probe.answered and not stopped and share is not None and share >= BUSY_CPU_SHARE:
            # Busy, not dead: it works (CPU) but its probe waits behind that work.
            if child.state != "busy":
                child.busy_since = time.monotonic()
                self.say(
                    f"supervisor: {name} is busy: its health check got {probe.why}, but it is working "
                    f"({share:.0%} of a core since the last check); not restarting it"
                )
            child.bad_checks = 0
            child.state = "busy"
            child.state_detail = f"{probe.why}; using {share:.0%} of a core"
            return ""
        child.bad_checks += 1
        if stopped:
            detail = f"stopped (state T: SIGSTOP?), pid {', '.join(map(str, stopped))}"
        elif not probe.answered and share is not None:
            detail = f"no CPU progress ({share:.1%} of a core)"
        else:
            detail = ""
        child.state = "unhealthy"
        child.state_detail = "; ".join(filter(None, [probe.why, detail]))
        if child.bad_checks < self.max_bad_checks:
            return ""
        hung = bool(stopped) or (not probe.answered and share is not None)
        child.state = "hung" if hung else "unhealthy"
        return (
            f"{'hung' if hung else 'unhealthy'}: failed {child.bad_checks} health checks in a row "
            f"({child.state_detail})"
        )

    def _restart_ended(self, name: str, _task: asyncio.Task[None]) -> None:
        self._restarts.pop(name, None)

    async def _restart(self, child: Child, why: str) -> None:
        if self._stopping.is_set():
            return
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
        try:
            await child.start()
        except Exception as exc:  # its executable gone, a full disk: the next check tries again
            child.started_at = time.monotonic()  # a failed start is no stable run: backoff grows
            self.say(f"supervisor: {child.spec.name} could not be started: {exc!r}")
            return
        if self._stopping.is_set():
            # stop() came while the process was being started: it found the old one only.
            await child.stop()
            return
        child.restarts += 1
        try:
            await child.wait_ready(self._client)
            if child.spec.on_ready is not None:
                await child.spec.on_ready()
            self.say(f"supervisor: {child.spec.name} is back (pid {child.pid})")
        except Exception as exc:  # the next check restarts it again (with a longer backoff)
            if not self._stopping.is_set():  # else stop() stopped it on purpose
                self.say(f"supervisor: {child.spec.name} did not come back: {exc}")

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self, first: list[str] | None = None) -> None:
        """Stop every child: those named in ``first`` first (in that order), then the rest in
        reverse start order."""
        self._stopping.set()
        order = [self.child(n) for n in (first or []) if any(c.spec.name == n for c in self.children)]
        order += [c for c in reversed(self.children) if c not in order]
        for child in order:
            try:
                await child.stop()
            except Exception as exc:  # the others must still be stopped
                self.say(f"supervisor: stopping {child.spec.name} failed: {exc!r}")
        if self._restarts:
            # Each ends soon now that _stopping is set: its wait, its start (then it stops what it
            # started) or its wait for a process stopped above.
            await asyncio.wait(set(self._restarts.values()), timeout=RESTART_STOP_TIMEOUT)
        await self._client.aclose()
