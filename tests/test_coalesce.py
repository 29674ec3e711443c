"""WELCOME's ``coalesce`` hint (docs/protocol.md §4): the bridge's tunnel writer holds queued frames
for that long after the first, so a stream's chunks leave in fewer WebSocket messages (a relay on a
Durable Object pays per incoming message). Real sans-I/O cores, the real Tunnel writer."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge import wire as p
from bridge.node.bridge import _hint
from bridge.tunnel.tunnel import Tunnel

from .test_protocol import deliver, pair


async def _messages_for_chunks(coalesce: float, chunks: int, gap: float) -> tuple[int, float]:
    """How many WebSocket messages ``chunks`` chunks ``gap`` seconds apart took, and the seconds
    the chunks took to come (a busy machine stretches the gaps)."""
    relay, bridge = pair()
    relay.open_stream(1, "GET", "ollama", "/api/chat", [])
    deliver(relay, bridge)
    sent: list[bytes] = []

    async def send_bytes(message: bytes) -> None:
        sent.append(message)

    async def send_text(_text: str) -> None:
        pass

    tunnel = Tunnel(bridge, send_bytes, send_text)
    tunnel.coalesce = coalesce
    try:
        bridge.send_response(1, 200, [("content-type", "application/x-ndjson")])
        tunnel.flush()
        began = time.monotonic()
        for i in range(chunks):
            await asyncio.sleep(gap)  # the engine's pace: one token every `gap` seconds
            bridge.send_data(1, b'{"token": %d}\n' % i, end_stream=i == chunks - 1)
            tunnel.flush()
        took = time.monotonic() - began
        await tunnel.send_now()  # what the writer still holds
        # Whatever the grouping, the relay receives every chunk, in order.
        body = b"".join(e.data for m in sent for e in relay.receive(m) if isinstance(e, p.DataReceived))
        assert body == b"".join(b'{"token": %d}\n' % i for i in range(chunks))
        return len(sent), took
    finally:
        await tunnel.aclose()


async def test_without_the_hint_every_chunk_is_its_own_message() -> None:
    sent, _ = await _messages_for_chunks(0.0, 10, 0.02)
    assert sent >= 10


async def test_coalescing_sends_fewer_messages_and_loses_nothing() -> None:
    # 10 chunks 20 ms apart held 100 ms at a time: a few messages, not 11 (on a busy machine whose
    # 20 ms sleeps last longer: about one for each 100 ms the chunks really took).
    sent, took = await _messages_for_chunks(0.1, 10, 0.02)
    assert sent <= max(5, int(took / 0.1) + 3), (sent, took)
    assert sent < 10


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, 0.0), ("0.05", 0.0), (True, 0.0), (-1, 0.0), (0.05, 0.05), (7, 1.0)],
)
def test_welcome_hints_are_numbers_clamped(value: object, expected: float) -> None:
    assert _hint(value, 1.0) == expected
