"""Per-key rate limits (--key-rate, --key-burst): each client key has its own token bucket; beyond it
the relay answers 429 with Retry-After, and other keys are not affected. Real relay process."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

import httpx
import websockets

from .procs import API_KEY, Relay, until

KEY2 = "bk_test0002_a-second-client-key-for-rates"


async def test_a_key_over_its_rate_gets_429_and_other_keys_do_not(make_relay: Callable[..., Relay]) -> None:
    # No bridge and a short grace: an authenticated request within its rate gets 503 (past the
    # authentication and the rate check), one beyond it 429.
    relay = make_relay(
        "--grace", "0.05", "--api-keys", f"{API_KEY},{KEY2}", "--key-rate", "0.5", "--key-burst", "4"
    )
    first = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as c:
        codes = [(await c.get("/r/ollama/api/tags", headers=first)).status_code for _ in range(4)]
        assert codes == [503] * 4
        r = await c.get("/r/ollama/api/tags", headers=first)
        assert r.status_code == 429 and r.headers["retry-after"] == "2"
        assert "rate limit" in r.json()["error"]
        # The same key in a client WebSocket upgrade is limited too.
        try:
            async with websockets.connect(relay.ws_url + "/r/ollama/ws", additional_headers=first):
                raise AssertionError("the upgrade went through")
        except websockets.InvalidStatus as refused:
            assert refused.response.status_code == 429
        # Another key has a bucket of its own.
        second = {"X-Bridge-Key": KEY2}
        assert (await c.get("/r/ollama/api/tags", headers=second)).status_code == 503
        # The bucket refills at one request every two seconds.
        until(
            lambda: httpx.get(relay.url + "/r/ollama/api/tags", headers=first, timeout=10).status_code == 503,
            10,
            "the first key's bucket to refill",
        )


async def test_without_key_rate_there_is_no_limit(make_relay: Callable[..., Relay]) -> None:
    relay = make_relay("--grace", "0.05")
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as c:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        codes = {(await c.get("/r/ollama/api/tags", headers=headers)).status_code for _ in range(30)}
    assert codes == {503}


def test_a_login_counts_against_its_keys_rate_and_a_failed_one_against_its_address(
    make_relay: Callable[..., Relay],
) -> None:
    """A login is a request of its key: beyond the key's rate it gets 429 with Retry-After and no
    session (logins were never counted, so a key holder could log in without limit, each login a
    row in the store). Failed logins count against their address with wrong keys (as before)."""
    relay = make_relay(
        "--grace", "0.05", "--api-keys", f"{API_KEY},{KEY2}", "--key-rate", "0.2", "--key-burst", "3"
    )
    login = relay.url + "/_relay/login"
    codes = [httpx.post(login, data={"key": API_KEY}, timeout=10).status_code for _ in range(3)]
    assert codes == [303] * 3
    r = httpx.post(login, data={"key": API_KEY}, timeout=10)
    assert r.status_code == 429, f"a login beyond its key's rate: {r.status_code}"
    assert int(r.headers["retry-after"]) >= 1 and "set-cookie" not in r.headers
    assert "rate limit" in r.json()["error"]
    with sqlite3.connect(relay.data_dir / "relay.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 3
    # The same bucket as the key's requests; another key has its own.
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.get(relay.url + "/r/ollama/api/tags", headers=bearer, timeout=10).status_code == 429
    assert httpx.post(login, data={"key": KEY2}, timeout=10).status_code == 303
    # Failed logins from one address: ten, then its wrong logins and keys get 429; a right login
    # from it is still let in.
    guesser = httpx.HTTPTransport(local_address="127.0.0.3")
    with httpx.Client(base_url=relay.url, transport=guesser, timeout=10) as c:
        codes = [c.post("/_relay/login", data={"key": f"bk_guess_{i}"}).status_code for i in range(10)]
        assert codes == [401] * 10
        for r in (
            c.post("/_relay/login", data={"key": "bk_guess"}),
            c.get("/", headers={"X-Bridge-Key": "bk_x"}),
        ):
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert c.post("/_relay/login", data={"key": KEY2}).status_code == 303
