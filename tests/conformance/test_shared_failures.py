"""Issue 20 on both relays: a shared request (an ``Idempotency-Key``, or a deterministic body:
temperature 0) whose stream fails before its answer gets the same complete, well-formed error response
as a plain one, for the first client and for every client that joined it; one whose answer breaks
mid-body gives every client a broken body, never one that looks complete. Checked with the real
``httpx``, ``ollama`` and ``openai`` clients through the real bridge (extension ``idempotency``,
docs/spec/relay.md E.6 and section 11.5).
"""

from __future__ import annotations

import json
import signal
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import ollama
import openai
import pytest

from ..procs import API_KEY, Bridge, Relay, until
from ..upstreams import MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}
MESSAGES = [{"role": "user", "content": "hi"}]
#: What the bridge's reason for a dead route names: a client must never see it.
UPSTREAM_ADDRESS = "127.0.0.1:9"


def whole_error(r: httpx.Response, status: int) -> dict[str, Any]:
    """The response is a complete JSON error of ``status`` that names no upstream address."""
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()  # read whole: a broken body raises before this
    assert isinstance(body.get("error"), str) and body["error"], body
    assert UPSTREAM_ADDRESS not in r.text, r.text
    return body


SHARING: dict[str, Callable[[], tuple[dict[str, str], dict[str, Any]]]] = {
    "idempotency-key": lambda: ({"Idempotency-Key": f"issue-20-{uuid.uuid4()}"}, {}),
    "temperature-0": lambda: ({}, {"temperature": 0, "nonce": str(uuid.uuid4())}),
}


@pytest.mark.extension("idempotency")
@pytest.mark.parametrize("sharing", sorted(SHARING))
@pytest.mark.parametrize(("route", "status"), [("dead", 502), ("absent", 404)])
def test_a_shared_request_failing_before_its_answer_gets_a_whole_error(
    relay: Relay, sharing: str, route: str, status: int
) -> None:
    """``dead``: the bridge cannot reach the upstream (RESET UPSTREAM_UNREACHABLE); ``absent``: no
    node serves the route. The same request unshared is the yardstick."""
    headers, extra = SHARING[sharing]()
    chat = {"model": MODEL, "messages": MESSAGES, "stream": False, **extra}
    with relay.client() as c:
        plain = whole_error(
            c.post(f"/r/{route}/v1/chat/completions", json={**chat, "temperature": 0.7}), status
        )
        shared = c.post(f"/r/{route}/v1/chat/completions", json=chat, headers=headers)
        assert whole_error(shared, status) == plain
        assert shared.headers.get("x-bridge-idempotent", "new") == "new"
        again = c.post(f"/r/{route}/v1/chat/completions", json=chat, headers=headers)
        assert whole_error(again, status) == plain  # an error is not replayed as an answer
        assert again.headers.get("x-bridge-idempotent", "new") == "new"


@pytest.mark.extension("idempotency")
@pytest.mark.parametrize(("route", "status"), [("dead", 502), ("absent", 404)])
def test_the_ollama_and_openai_clients_see_a_clean_error_for_a_deterministic_request(
    relay: Relay, route: str, status: int
) -> None:
    client = ollama.Client(host=f"{relay.url}/r/{route}", headers=AUTH, timeout=30)
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "seed": 20})
    assert caught.value.status_code == status and UPSTREAM_ADDRESS not in str(caught.value)
    sdk = openai.OpenAI(base_url=f"{relay.url}/r/{route}/v1", api_key=API_KEY, max_retries=0, timeout=30)
    with pytest.raises(openai.APIStatusError) as failed:
        sdk.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, seed=20)  # type: ignore[arg-type]
    assert failed.value.status_code == status and UPSTREAM_ADDRESS not in str(failed.value)


# ------------------------------------------------------------------------------------ joined


def joins(relay: Relay) -> float:
    """Repeats served from an answer in flight or finished (both relays publish the counter)."""
    with relay.client() as c:
        for line in c.get("/_relay/metrics").text.splitlines():
            if line.startswith("bridge_relay_idempotent_joins_total "):
                return float(line.split()[1])
    return 0.0


@pytest.fixture
def lonely(
    make_relay: Callable[..., Relay], bridges: Callable[..., Bridge], upstream: str
) -> Iterator[tuple[Relay, Bridge]]:
    """A relay of the test's kind with a short grace and one bridge (route ``up``) to kill."""
    relay = make_relay(grace=3)
    yield relay, bridges(relay, {"up": upstream})


@pytest.mark.extension("idempotency")
def test_a_joined_client_of_a_request_whose_node_is_lost_before_the_answer_gets_the_same_whole_error(
    lonely: tuple[Relay, Bridge],
) -> None:
    relay, bridge = lonely
    key = {"Idempotency-Key": f"issue-20-{uuid.uuid4()}"}
    answers: dict[str, httpx.Response] = {}
    broken: dict[str, Exception] = {}

    def ask(name: str) -> None:
        try:
            with relay.client() as c:
                answers[name] = c.post("/r/up/hang", content=b"{}", headers=key)
        except httpx.TransportError as exc:  # e.g. "incomplete chunked read": what issue 20 found
            broken[name] = exc

    first = threading.Thread(target=ask, args=("first",))
    first.start()
    until(lambda: relay.health()["requests_in_flight"] == 1, 15, "the first request at the bridge")
    before = joins(relay)
    joined = threading.Thread(target=ask, args=("joined",))
    joined.start()
    until(lambda: joins(relay) == before + 1, 15, "the second client to join")
    bridge.proc.signal(signal.SIGKILL)  # the node is lost before any answer
    first.join(30)
    joined.join(30)
    assert not broken, f"a broken response instead of an error: {broken}"
    status = answers["first"].status_code
    assert status in (502, 503), answers["first"].text
    body = whole_error(answers["first"], status)
    assert whole_error(answers["joined"], status) == body
    assert answers["joined"].headers["x-bridge-idempotent"] == "joined"


@pytest.mark.extension("idempotency")
def test_a_joined_client_of_an_answer_cut_mid_body_gets_a_broken_body(lonely: tuple[Relay, Bridge]) -> None:
    relay, bridge = lonely
    key = {"Idempotency-Key": f"issue-20-{uuid.uuid4()}", "Accept-Encoding": "identity"}
    with relay.client() as c1, relay.client() as c2:
        with c1.stream("GET", "/r/up/hang?head=1", headers=key) as first:
            assert first.status_code == 200 and first.headers["x-bridge-idempotent"] == "new"
            first_chunks = first.iter_raw()
            assert next(first_chunks) == b"partial"
            with c2.stream("GET", "/r/up/hang?head=1", headers=key) as joined:
                assert joined.status_code == 200 and joined.headers["x-bridge-idempotent"] == "joined"
                joined_chunks = joined.iter_raw()
                assert next(joined_chunks) == b"partial"  # from the first byte
                bridge.proc.signal(signal.SIGKILL)
                for chunks in (first_chunks, joined_chunks):
                    with pytest.raises(httpx.TransportError):
                        for _ in chunks:
                            pass


@pytest.mark.extension("idempotency")
def test_a_shared_answer_is_whole_for_the_first_and_the_joined_client(relay: Relay) -> None:
    """The other side of the coin: a streamed answer joined mid-way arrives whole for both, once."""
    key = {"Idempotency-Key": f"stream-{uuid.uuid4()}"}
    with relay.client() as c1, relay.client() as c2:
        with c1.stream("GET", "/r/up/stream?n=12&interval=0.2", headers=key) as first:
            lines = first.iter_lines()
            got = [json.loads(next(lines))["i"]]
            again = c2.get("/r/up/stream?n=12&interval=0.2", headers=key)
            got += [json.loads(line)["i"] for line in lines if line]
    assert got == list(range(12))
    assert again.headers["x-bridge-idempotent"] == "joined"
    assert [json.loads(line)["i"] for line in again.text.splitlines() if line] == list(range(12))
