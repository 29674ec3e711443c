"""Repeated requests: which requests are the same (:func:`bridge.relay.shared.identity`) and how a
shared answer ends for every reader (whole, answered by the relay, or broken off)."""

from __future__ import annotations

import asyncio
import json

import pytest

from bridge.errors import SharedOverflow
from bridge.relay.forward import Request
from bridge.relay.shared import Shared, SharedCache, identity


def request(body: object, *, method: str = "POST", headers: list[tuple[str, str]] | None = None) -> Request:
    data = None if body is None else json.dumps(body).encode()
    return Request(method, "ollama", "/api/chat", headers or [], data, "1.2.3.4", data is not None)


def test_an_idempotency_key_makes_requests_the_same_per_client_key_and_route() -> None:
    keyed = request({"model": "m"}, headers=[("Idempotency-Key", "k1")])
    assert identity("key-a", keyed, 300) == ("key-a", "key:ollama:k1")
    assert identity("key-b", keyed, 300) == ("key-b", "key:ollama:k1")  # never across client keys
    long = request({}, headers=[("idempotency-key", "x" * 1000)])
    assert identity("a", long, 300) == ("a", "key:ollama:" + "x" * 256)


@pytest.mark.parametrize(
    ("body", "shared"),
    [
        ({"model": "m", "temperature": 0}, True),  # OpenAI's
        ({"model": "m", "options": {"temperature": 0.0}}, True),  # Ollama's
        ({"model": "m", "temperature": 0.7}, False),
        ({"model": "m", "temperature": False}, False),  # a bool is no temperature
        ({"model": "m"}, False),
        ([0], False),
    ],
)
def test_a_deterministic_body_makes_requests_the_same(body: object, shared: bool) -> None:
    found = identity("a", request(body), 300)
    assert (found is not None) == shared
    if found is not None:
        assert found[1].startswith("sha256:") and identity("a", request(body), 300) == found
        other = {**body, "messages": ["different"]} if isinstance(body, dict) else body
        assert identity("a", request(other), 300) != found


def test_what_is_never_shared() -> None:
    cold = {"model": "m", "temperature": 0}
    assert identity("a", request(cold), 0) is None  # sharing off
    assert identity("a", request(None), 300) is None  # a body streamed, not held whole
    assert identity("a", request(cold, method="PUT"), 300) is None  # only POST bodies by content


async def test_every_reader_sees_the_same_end() -> None:
    whole = Shared(1000)
    whole.start(200, [("content-type", "text/plain")])
    whole.append(b"abc")
    whole.finish()
    assert [c async for c in whole.body()] == [b"abc"] and whole.ok

    answered = Shared(1000)
    answered.answer(502, [("content-type", "application/json")], b'{"error":"x"}', "x")
    assert await answered.head() == (502, [("content-type", "application/json"), ("content-length", "13")])
    assert [c async for c in answered.body()] == [b'{"error":"x"}']  # complete, no exception
    assert not answered.ok and answered.refused == "x"

    broken = Shared(1000)
    broken.start(200, [])
    broken.append(b"part")
    broken.fail("cut")
    with pytest.raises(ConnectionError):
        _ = [c async for c in broken.body()]

    big = Shared(4)
    big.start(200, [])
    big.append(b"12345")
    big.finish()
    with pytest.raises(SharedOverflow):
        _ = [c async for c in big.body()]


def put(cache: SharedCache, key: tuple[str, str]) -> Shared:
    entry = cache.put(key)
    assert entry is not None, f"no room for {key}"
    return entry


def finished(cache: SharedCache, key: tuple[str, str], size: int = 0) -> Shared:
    entry = put(cache, key)
    entry.start(200, [])
    if size:
        entry.append(b"x" * size)
    entry.finish()
    return entry


def test_the_cache_drops_what_must_not_be_replayed() -> None:
    cache = SharedCache(ttl=300, max_entries=2, max_bytes=100)
    answered = put(cache, ("a", "1"))
    answered.answer(502, [], b"{}", "failed")
    assert cache.get(("a", "1")) is None  # a refused answer is not served again
    kept = finished(cache, ("a", "2"))
    assert cache.get(("a", "2")) is kept
    put(cache, ("a", "3"))
    put(cache, ("a", "4"))
    assert len(cache) == 2 and cache.get(("a", "2")) is None  # the oldest left first
    assert cache.bytes == 0


def test_the_cache_is_bounded_by_total_bytes() -> None:
    cache = SharedCache(ttl=300, max_entries=100, max_bytes=40, max_total=100)
    for i in range(10):
        finished(cache, ("a", str(i)), 30)
        assert cache.bytes <= 100
    assert [k for k in ("0", "6", "7", "8", "9") if cache.get(("a", k))] == ["7", "8", "9"]
    assert cache.bytes == 90


def test_one_key_cannot_push_another_keys_answers_out() -> None:
    cache = SharedCache(ttl=300, max_entries=4, max_bytes=100, max_total=1000)
    mine = finished(cache, ("b", "mine"), 10)
    for i in range(50):
        finished(cache, ("a", str(i)), 10)
    assert cache.get(("b", "mine")) is mine
    assert len(cache) == 4


def test_running_answers_are_never_evicted_and_one_without_room_is_uncached() -> None:
    cache = SharedCache(ttl=300, max_entries=2, max_bytes=100, max_total=1000)
    one, two = put(cache, ("a", "1")), put(cache, ("a", "2"))
    assert cache.put(("a", "3")) is None  # served uncached
    assert cache.get(("a", "1")) is one and cache.get(("a", "2")) is two
    # Growth past the total with only running answers: the one that grows leaves the cache.
    small = SharedCache(ttl=300, max_entries=10, max_bytes=100, max_total=50)
    first, second = put(small, ("a", "1")), put(small, ("b", "1"))
    first.start(200, [])
    second.start(200, [])
    first.append(b"x" * 30)
    second.append(b"x" * 30)
    assert small.get(("b", "1")) is None and small.get(("a", "1")) is first
    assert small.bytes == 30 and not second.cached


async def test_an_answer_nobody_reads_and_nobody_can_join_is_stopped() -> None:
    cache = SharedCache(ttl=300, max_entries=1, max_bytes=100)

    async def forever() -> None:
        await asyncio.Event().wait()

    kept = put(cache, ("a", "1"))
    kept.task = asyncio.create_task(forever())
    uncached = Shared(100)
    uncached.task = asyncio.create_task(forever())
    for entry in (kept, uncached):
        token = entry.join()
        entry.leave(token)
    await asyncio.sleep(0)
    assert not kept.task.done(), "a cached answer may be joined: it runs on"
    assert uncached.task.cancelled()
    cache._drop(("a", "1"))  # evicted (here by hand) while running and unread: stopped too
    await asyncio.sleep(0)
    assert kept.task.cancelled()


async def test_an_answer_over_the_cap_reaches_every_reader_whole_in_bounded_memory() -> None:
    cache = SharedCache(ttl=300, max_entries=10, max_bytes=10)
    entry = put(cache, ("a", "big"))
    chunks = [bytes([65 + i]) * 4 for i in range(20)]  # 80 bytes through a 10-byte answer
    held: list[int] = []

    async def produce() -> None:
        entry.start(200, [])
        for chunk in chunks:
            entry.append(chunk)
            held.append(sum(len(c) for c in entry.chunks))
            assert entry.held == held[-1], "the running count of bytes held is the chunks' sum"
            assert await entry.room()
        entry.finish()

    async def read(pause: float) -> bytes:
        out = b""
        async for chunk in entry.body():
            out += chunk
            await asyncio.sleep(pause)
        return out

    readers = [asyncio.create_task(read(0)), asyncio.create_task(read(0.001))]
    await asyncio.sleep(0)
    await produce()
    assert await asyncio.gather(*readers) == [b"".join(chunks)] * 2
    assert max(held) <= 10 + 4, f"held {max(held)} bytes for a 10-byte cap"
    assert cache.get(("a", "big")) is None and cache.bytes == 0, "not kept for replay"
    with pytest.raises(SharedOverflow):  # a reader who comes later cannot have its start
        entry.join()


async def test_an_answer_over_the_cap_that_nobody_reads_is_not_produced_further() -> None:
    job = Shared(10)
    job.start(200, [])
    job.append(b"x" * 8)
    assert await job.room()
    job.append(b"x" * 8)
    assert not await job.room()


def test_the_upstream_credentials_a_request_carries_are_part_of_its_identity() -> None:
    cold = {"model": "m", "temperature": 0}
    plain = identity("a", request(cold), 300)
    for name in ("Authorization", "Cookie"):
        alice = identity("a", request(cold, headers=[(name, "alice")]), 300)
        bob = identity("a", request(cold, headers=[(name, "bob")]), 300)
        assert alice is not None and bob is not None
        assert len({plain, alice, bob}) == 3, name
        assert identity("a", request(cold, headers=[(name.lower(), "alice")]), 300) == alice
        keyed = [("Idempotency-Key", "k"), (name, "alice")]
        assert identity("a", request(cold, headers=keyed), 300) != identity(
            "a", request(cold, headers=[("Idempotency-Key", "k"), (name, "bob")]), 300
        )
