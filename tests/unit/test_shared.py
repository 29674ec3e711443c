"""Repeated requests: which requests are the same (:func:`bridge.relay.shared.identity`) and how a
shared answer ends for every reader (whole, answered by the relay, or broken off)."""

from __future__ import annotations

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


def test_the_cache_drops_what_must_not_be_replayed() -> None:
    cache = SharedCache(ttl=300, max_entries=2, max_bytes=100)
    answered = cache.put(("a", "1"))
    answered.answer(502, [], b"{}", "failed")
    assert cache.get(("a", "1")) is None  # a refused answer is not served again
    kept = cache.put(("a", "2"))
    kept.start(200, [])
    kept.finish()
    assert cache.get(("a", "2")) is kept
    cache.put(("a", "3"))
    cache.put(("a", "4"))
    assert len(cache) == 2 and cache.get(("a", "2")) is None  # the oldest left first
