"""The bridge's reconnect backoff (docs/spec/wire.md §10): it starts over only after a session
that was established and lasted; a relay that closes right after WELCOME is retried with the
backoff growing, not several times a second. The sessions are stood in by a coroutine (what is
checked is the loop's arithmetic, not a WebSocket)."""

from __future__ import annotations

import asyncio
import random

import pytest

from bridge.config import BridgeConfig
from bridge.node import bridge as node


async def _bounds(monkeypatch: pytest.MonkeyPatch, sessions: int) -> list[float]:
    """The upper bound of each backoff draw after ``sessions`` established sessions."""
    b = node.Bridge(BridgeConfig(sample_interval=0))
    bounds: list[float] = []
    count = 0

    async def established() -> bool:  # WELCOME came, then the relay closed at once
        nonlocal count
        count += 1
        if count == sessions:
            b.stop()
        return True

    def uniform(low: float, high: float) -> float:
        bounds.append(high)
        return 0.0  # no wait

    monkeypatch.setattr(b, "_session", established)
    monkeypatch.setattr(random, "uniform", uniform)  # what the reconnect loop draws from
    await b.run()
    return bounds


async def test_sessions_closed_right_after_welcome_back_off(monkeypatch: pytest.MonkeyPatch) -> None:
    assert await _bounds(monkeypatch, 5) == [1.0, 2.0, 4.0, 5.0]  # 0.5 x 2^attempt, capped at 5


async def test_a_session_that_lasted_starts_the_backoff_over(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node, "STABLE_SESSION", 0.0)  # every session counts as one that lasted
    assert await _bounds(monkeypatch, 4) == [0.5, 0.5, 0.5]


async def test_a_stop_during_the_handshake_ends_the_bridge_at_once() -> None:
    """A relay that accepts the TCP connection and never answers the WebSocket handshake: a stop
    then ends the bridge without waiting out the connect timeout (twice: the handshake, then the
    wait for WELCOME), and the half-open connection is closed."""
    accepted = asyncio.Event()
    closed = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read()  # until the bridge closes its end
        closed.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    b = node.Bridge(BridgeConfig(relay=f"ws://127.0.0.1:{port}", connect_timeout=120, sample_interval=0))
    run = asyncio.create_task(b.run())
    try:
        await asyncio.wait_for(accepted.wait(), 30)
        b.stop()
        await asyncio.wait_for(run, 30)  # without the fix: 120 s
        await asyncio.wait_for(closed.wait(), 30)
        assert b.sessions == 0
    finally:
        run.cancel()
        server.close()
        await server.wait_closed()
