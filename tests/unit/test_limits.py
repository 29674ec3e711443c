"""Issue 16's pure decisions on the relay's resources (docs/security.md §7, §11): the bodies the
relay reads itself, job submissions, the failure limiter's address, node names, the per-key
stream count, the repeated-request cache."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bridge.config import BridgeConfig, node_name_from, valid_node_name
from bridge.errors import ConfigError
from bridge.relay.bodies import BodyRefused, declared_too_large, read_small_body
from bridge.relay.jobs import JobSpec, parse_job


def _receiver(*messages: dict[str, Any], then_wait: bool = False) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        if queue:
            return queue.pop(0)
        if then_wait:
            await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    return receive


def test_a_declared_length_over_the_limit_or_invalid_is_too_large() -> None:
    assert declared_too_large([("Content-Length", "11")], 10)
    assert declared_too_large([("content-length", "1e3")], 10)
    assert not declared_too_large([("content-length", "10")], 10)
    assert not declared_too_large([], 10)


async def test_read_small_body_refuses_before_reading_and_as_it_passes_the_limit() -> None:
    never = _receiver(then_wait=True)
    assert await read_small_body([("content-length", "9")], never, 8, 0.1) == BodyRefused(
        413, "request body exceeds 8 bytes"
    )
    chunks = _receiver(
        {"type": "http.request", "body": b"12345", "more_body": True},
        {"type": "http.request", "body": b"6789", "more_body": True},
        then_wait=True,
    )
    got = await read_small_body([], chunks, 8, 0.1)
    assert isinstance(got, BodyRefused) and got.status == 413
    whole = _receiver(
        {"type": "http.request", "body": b"1234", "more_body": True},
        {"type": "http.request", "body": b"5678", "more_body": False},
    )
    assert await read_small_body([], whole, 8, 0.1) == b"12345678"


async def test_read_small_body_gives_408_on_a_stall_and_none_when_the_client_left() -> None:
    stalled = _receiver({"type": "http.request", "body": b"ke", "more_body": True}, then_wait=True)
    got = await read_small_body([("content-length", "8")], stalled, 8, 0.05)
    assert isinstance(got, BodyRefused) and got.status == 408
    assert await read_small_body([], _receiver(), 8, 0.05) is None


async def test_read_small_body_gives_408_when_the_whole_body_is_not_in_by_its_deadline() -> None:
    """A byte every 10 ms never stalls (100 ms allowed), so only a deadline on the whole body ends
    it: 408 at the deadline, not when the client stops; a body in time is read."""

    async def drip() -> dict[str, Any]:
        await asyncio.sleep(0.01)  # the client's pace, not a synchronisation
        return {"type": "http.request", "body": b"k", "more_body": True}

    loop = asyncio.get_running_loop()
    started = loop.time()
    got = await read_small_body([], drip, 8192, 0.1, deadline=0.3)
    assert got == BodyRefused(408, "request body too slow: not complete within 0.3 s")
    assert 0.3 <= loop.time() - started < 2
    whole = _receiver({"type": "http.request", "body": b"key=1", "more_body": False})
    assert await read_small_body([], whole, 8192, 0.1, deadline=0.3) == b"key=1"
    stalled = _receiver({"type": "http.request", "body": b"ke", "more_body": True}, then_wait=True)
    got = await read_small_body([], stalled, 8192, 0.05, deadline=5)
    assert isinstance(got, BodyRefused) and "stalled" in got.error


@pytest.mark.parametrize(
    ("submission", "words"),
    [
        (b"", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[]", "object"),
        (b'{"route": 1}', "strings"),
        (b'{"route": ""}', "route"),
        (b'{"method": "BAD METHOD"}', "method"),
        (b'{"path": "/\\n"}', "path"),
        (b'{"headers": {"X-A": 1}}', "strings"),
        (b'{"headers": {"Bad Name": "x"}}', "header"),
        (b'{"headers": {"X-\\u20ac": "x"}}', "header"),
        (b'{"headers": {"X-A": "\\u20ac"}}', "header"),
        (b'{"headers": {"X-A": "a\\r\\nX-B: b"}}', "header"),
    ],
)
def test_a_submission_that_is_no_job_says_why(submission: bytes, words: str) -> None:
    got = parse_job(submission, "up")
    assert isinstance(got, str) and words in got


def test_a_job_gets_defaults_its_body_and_no_framing_headers() -> None:
    assert parse_job(b"{}", "up") == JobSpec("up", "POST", "/", (), b"")
    spec = {
        "route": "s",
        "method": "get",
        "path": "/x?y=1",
        "headers": {"X-A": "1", "Host": "h", "Content-Length": "9", "Transfer-Encoding": "chunked"},
        "body": {"k": [1]},
    }
    assert parse_job(json.dumps(spec).encode(), "up") == JobSpec(
        "s", "GET", "/x?y=1", (("x-a", "1"),), b'{"k": [1]}'
    )
    assert parse_job(b'{"body": "text"}', "up") == JobSpec("up", "POST", "/", (), b"text")


def test_jobs_expire_from_their_finish_and_a_running_one_never(tmp_path: Any) -> None:
    from bridge.relay.store import Store

    store = Store(tmp_path)
    store.add_job("old-running", "k", {})
    store.add_job("done", "k", {})
    store.finish_job("done", "done", 200, [], b"x" * 10, None)
    store.db.execute("UPDATE jobs SET created = 0")  # created long ago: only the finish counts
    finished = store.get_job("done", "k")
    assert finished is not None and finished.finished is not None
    assert store.job_usage("k") == (2, 10)
    store.expire_jobs(finished.finished - 1)
    assert store.job_usage("k") == (2, 10), "a job finished after the cut stays"
    store.expire_jobs(finished.finished + 1)
    assert store.get_job("done", "k") is None and store.get_job("old-running", "k") is not None
    assert store.job_usage("k") == (1, 0) and store.job_usage("other") == (0, 0)
    store.close()


@pytest.mark.parametrize("name", ["a", "kaggle-gpu-1", "nb_a.b", "X" * 64, "127.0.0.1"])
def test_valid_node_names(name: str) -> None:
    assert valid_node_name(name)


@pytest.mark.parametrize("name", ["", "X" * 65, "evil\r\nX-Injected: yes", "a b", "n\u00e9", "::1", "a;b"])
def test_invalid_node_names(name: str) -> None:
    assert not valid_node_name(name)
    with pytest.raises(ConfigError, match="node name"):
        BridgeConfig(node_name=name or " ")


def test_a_default_node_name_is_made_valid() -> None:
    assert node_name_from("kaggle-gpu.internal") == "kaggle-gpu.internal"
    assert node_name_from("::1") == "1"
    assert node_name_from("h\u00f4te mon") == "h-te-mon"
    assert node_name_from("x" * 100) == "x" * 64
    assert node_name_from("") == node_name_from(":::") == "node"
    for text in ("::1", "h\u00f4te", "a\r\nb", ""):
        assert valid_node_name(node_name_from(text))


def test_the_series_of_departed_nodes_are_bounded_and_a_returning_node_keeps_its_own() -> None:
    import prometheus_client as prom

    from bridge.stats import DEPARTED_KEPT, RelayStats

    stats = RelayStats(prom.CollectorRegistry())

    def nodes() -> set[str]:
        return {labels[0] for labels in stats.requests._metrics}

    body = {"kind": "request", "route": "up", "model": "m", "status": 200, "ttft_s": 0.1}
    for i in range(DEPARTED_KEPT + 10):
        stats.publish(f"n{i}", body)
    stats.publish("live", body)
    stats.forget("back")  # a node that leaves and comes back is not a departed one
    stats.arrived("back")
    stats.publish("back", body)
    for i in range(DEPARTED_KEPT + 10):
        stats.forget(f"n{i}")
    kept = {f"n{i}" for i in range(10, DEPARTED_KEPT + 10)}
    assert nodes() == kept | {"live", "back"}
    assert {labels[0] for labels in stats.ttft._metrics} == kept | {"live", "back"}


def test_node_history_keeps_the_latest_events_of_the_latest_names(tmp_path: Any) -> None:
    from bridge.relay.store import NODES_KEPT, Store

    store = Store(tmp_path)
    for i in range(NODES_KEPT + 20):
        for _ in range(2):  # each name comes twice: only its latest connect and disconnect stay
            store.record_node(f"n{i}", "connected", at=float(i))
            store.record_node(f"n{i}", "disconnected", at=float(i) + 0.5)
    store.record_node("n3", "connected", at=1000.0)  # an old name that is back and connected
    (rows,) = store.db.execute("SELECT COUNT(*) FROM node_events").fetchone()
    assert rows <= 2 * NODES_KEPT
    assert store.last_node_event("connected") == (1000.0, "n3")
    assert store.last_node_event("disconnected") == (NODES_KEPT + 19.5, f"n{NODES_KEPT + 19}")
    assert store.close_dangling(2000.0) == 1  # n3's connection is the one left open
    store.close()


async def test_streams_per_key_are_counted_and_a_job_waits_its_turn() -> None:
    from bridge.relay.auth import KEY_STREAMS_EXCEEDED, KeyStreams, Refused

    streams = KeyStreams(2)
    assert streams.acquire("a") is None and streams.acquire("a") is None
    assert streams.acquire("a") == Refused(429, 1, KEY_STREAMS_EXCEEDED)
    assert streams.acquire("b") is None, "another key has its own count"
    waiter = asyncio.create_task(streams.wait("a"))
    await asyncio.sleep(0)
    assert not waiter.done()
    streams.release("b")  # another key's release does not give "a" a stream
    await asyncio.sleep(0)
    assert not waiter.done()
    streams.release("a")
    await asyncio.wait_for(waiter, 1)
    assert streams.open("a") == 2 and streams.open("b") == 0
    unlimited = KeyStreams(0)
    assert all(unlimited.acquire("a") is None for _ in range(1000))


def test_an_operators_own_secrets_must_be_long() -> None:
    from bridge.config import MIN_SECRET, RelayConfig

    RelayConfig(node_token="t" * MIN_SECRET, api_keys=("k" * MIN_SECRET,))
    RelayConfig()  # empty: the relay makes its own
    with pytest.raises(ConfigError, match="node token is 8 characters"):
        RelayConfig(node_token="short-tk")
    with pytest.raises(ConfigError, match="1 of the client keys"):
        RelayConfig(api_keys=("k" * MIN_SECRET, "bk_short"))


def test_route_labels_of_the_request_counter_are_bounded() -> None:
    """Anyone may ask for /r/<anything>/ (a 404 at most): the route label of each new name was a
    series kept for the relay's life. Names no bridge could serve, and names past the first 64,
    count as "other"."""
    from bridge.relay.metrics import MAX_ROUTE_LABELS, RelayMetrics

    metrics = RelayMetrics()

    def request(route: str) -> None:
        metrics.started()
        metrics.finished(route, 404)

    request("ollama")
    request("x" * 40_000)
    request("Not-A-Route")
    for i in range(1000):
        request(f"r{i}")
    request("ollama")
    routes = {s.labels["route"] for m in metrics.requests.collect() for s in m.samples}
    assert len(routes) == MAX_ROUTE_LABELS + 1 and "ollama" in routes and "other" in routes
    assert all(len(r) < 64 for r in routes)
