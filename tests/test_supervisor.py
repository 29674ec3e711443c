"""The supervisor's stop against a restart under way (deployment/supervisor.py): a notebook's cell
ends (or is interrupted) while an engine is being restarted, and nothing may be left running.

The engines are stood in by a plain ``sleep`` process: what is checked is the supervisor's
bookkeeping of its children's processes, not an engine."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from deployment.children import Children
from deployment.supervisor import ChildSpec, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def _watched_child(
    tmp_path: Path, on_exit: Callable[[int], None], on_spawn: Callable[[str, int, str], None] | None = None
) -> tuple[Supervisor, Any]:
    sup = Supervisor(
        lambda _: None,
        interval=0.05,
        bad_checks=1,
        backoff_initial=0.01,
        on_exit=on_exit,
        on_spawn=on_spawn,
    )
    child = await sup.add(ChildSpec("sleeper", SLEEPER, dict(os.environ), tmp_path / "sleeper.log"))
    return sup, child


@pytest.mark.timeout(60)
async def test_a_stop_while_a_restart_spawns_stops_the_new_process_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The restart's process is spawned but not yet the child's when stop() stops every child:
    stop() finds the old, dead process only. The restart then must stop what it started, and
    stop() must wait for it; before, the new process served on after the stop."""
    spawning, release = asyncio.Event(), asyncio.Event()
    spawned: list[int] = []
    real_spawn = asyncio.create_subprocess_exec

    async def held_spawn(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        proc = await real_spawn(*args, **kwargs)
        spawned.append(proc.pid)
        if len(spawned) == 2:  # the restart's: held between the spawn and the child knowing it
            spawning.set()
            await release.wait()
        return proc

    exits: list[int] = []
    stopped_old = asyncio.Event()

    def on_exit(pid: int) -> None:
        exits.append(pid)
        if exits.count(spawned[0]) == 2:  # the restart's stop, then stop()'s
            stopped_old.set()

    monkeypatch.setattr(asyncio, "create_subprocess_exec", held_spawn)  # what Child.start calls
    sup, child = await _watched_child(tmp_path, on_exit)
    watch = asyncio.create_task(sup.watch())
    os.killpg(child.pid, signal.SIGKILL)  # it exited: the next check restarts it
    await spawning.wait()
    stop = asyncio.create_task(sup.stop())
    await stopped_old.wait()  # stop() went through the children and found the old process
    release.set()
    await stop
    await watch
    assert len(spawned) == 2
    assert _gone(spawned[1]), "the process the restart started runs on after the supervisor's stop"
    assert child.restarts == 0  # it never counted as restarted: the stop came first


@pytest.mark.timeout(60)
async def test_a_stop_during_a_restarts_backoff_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart waiting out its backoff when stop() comes ends without starting a process."""
    spawns: list[int] = []
    sup, child = await _watched_child(tmp_path, lambda _: None, lambda _n, pid, _a: spawns.append(pid))
    sup.backoff_initial = 600.0  # the restart waits (on the stop) instead of starting
    backing_off = asyncio.Event()
    real_backoff = sup.backoff

    def backoff(c: Any) -> float:
        backing_off.set()
        return real_backoff(c)

    monkeypatch.setattr(sup, "backoff", backoff)
    old = child.pid
    watch = asyncio.create_task(sup.watch())
    os.killpg(old, signal.SIGKILL)
    await backing_off.wait()  # the watch's next check started the restart
    await sup.stop()
    await watch
    assert spawns == [old] and child.restarts == 0 and _gone(old)


@pytest.mark.timeout(60)
async def test_a_child_whose_stop_fails_does_not_keep_the_others_running(tmp_path: Path) -> None:
    """A full disk makes the record of running processes fail to save when a child is stopped
    (on_exit): stop() goes on to the next child instead of leaving the rest running."""

    def on_exit(pid: int) -> None:
        raise OSError(28, "No space left on device")

    said: list[str] = []
    sup = Supervisor(said.append, interval=60, on_exit=on_exit)
    first = await sup.add(ChildSpec("first", SLEEPER, dict(os.environ), tmp_path / "first.log"))
    second = await sup.add(ChildSpec("second", SLEEPER, dict(os.environ), tmp_path / "second.log"))
    pids = [first.pid, second.pid]
    await sup.stop()
    assert all(pid is not None and _gone(pid) for pid in pids), "a child runs on after the stop"
    assert sum("No space left on device" in s for s in said) == 2, said


@pytest.mark.timeout(60)
async def test_a_restart_that_cannot_start_says_why_and_backs_off(tmp_path: Path) -> None:
    """The child's executable is gone when it is restarted: each try says why, and the backoff
    grows from one try to the next (a failed start is no stable run). Before, the restart task
    died with an exception nobody read and every try waited the first backoff again."""
    exe = tmp_path / "sleeper.sh"
    exe.write_text("#!/bin/sh\nexec sleep 600\n")
    exe.chmod(0o755)
    said: list[str] = []
    failed_twice = asyncio.Event()

    def say(text: str) -> None:
        said.append(text)
        if sum("could not be started" in s for s in said) == 2:
            failed_twice.set()

    sup = Supervisor(say, interval=0.05, bad_checks=1, backoff_initial=0.01, stable_after=5.0)
    child = await sup.add(ChildSpec("sleeper", [str(exe)], dict(os.environ), tmp_path / "sleeper.log"))
    child.started_at -= 10  # it ran stably: the first restart starts the backoff afresh
    exe.unlink()
    assert child.pid is not None
    os.killpg(child.pid, signal.SIGKILL)
    watch = asyncio.create_task(sup.watch())
    try:
        await asyncio.wait_for(failed_twice.wait(), 30)
    finally:
        await sup.stop()
        await watch
    tries = [s for s in said if "restarting in" in s]
    assert "restarting in 0.01 s" in tries[0] and "restarting in 0.02 s" in tries[1], tries
    assert "FileNotFoundError" in next(s for s in said if "could not be started" in s)


def test_the_record_of_children_survives_a_failed_write(tmp_path: Path) -> None:
    """Children.add and .remove never raise for the disk: the record in memory stays right (a
    stop still finds every process) and write_error says what was not saved."""
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state folder should be")
    children = Children(blocker / "children.json")
    children.add("me", os.getpid())
    assert [r.pid for r in children.running()] == [os.getpid()]
    assert "children.json" in children.write_error
    children.remove(os.getpid())
    assert children.running() == []
