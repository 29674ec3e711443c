"""A client that sends its request head and then stops sending the body (--body-timeout): the relay
answers 408 and frees the stream, whether it was reading a small body whole or streaming a large one
to the bridge; a slow but steady upload is not cut. Real relay, bridge and upstream processes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from .procs import API_KEY, Bridge, Relay, until


async def _stalled_upload(relay: Relay, length: int, sent: int) -> bytes:
    """Send a head announcing ``length`` bytes, then ``sent`` of them, then nothing; return what
    the relay answers before it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        writer.write(
            f"POST /r/up/sha256 HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
            + b"x" * sent
        )
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 15)
    finally:
        writer.close()


async def test_a_stalled_body_gets_408_and_frees_its_stream(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str
) -> None:
    relay = make_relay("--body-timeout", "1")
    make_bridge(relay, {"up": upstream})
    small = await _stalled_upload(relay, 1000, 10)  # read whole before a node is chosen
    assert small.startswith(b"HTTP/1.1 408"), small[:80]
    large = await _stalled_upload(relay, 4 * 1024 * 1024, 100_000)  # streamed to the bridge
    assert large.startswith(b"HTTP/1.1 408"), large[:80]
    until(
        lambda: relay.client().get("/_relay/health").json()["requests_in_flight"] == 0, 10, "no request left"
    )


async def test_a_slow_steady_upload_is_not_cut(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], upstream: str
) -> None:
    # A timeout of 2 s with a byte every 0.4 s: 3.2 s in all, longer than the timeout, while a
    # stall of the relay (a busy CI machine) would need 1.6 s to look like a gap.
    relay = make_relay("--body-timeout", "2")
    make_bridge(relay, {"up": upstream})

    async def trickle() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b"y" * 1000
            await asyncio.sleep(0.4)  # the client's pace (what is tested), not synchronisation

    async with relay.aclient() as c:
        r = await c.post("/r/up/sha256", content=trickle(), headers={"content-length": "8000"})
    assert r.status_code == 200 and r.json()["length"] == 8000
