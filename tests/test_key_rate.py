"""Per-key rate limits (--key-rate, --key-burst): each client key has its own token bucket; beyond it
the relay answers 429 with Retry-After, and other keys are not affected. Real relay process."""

from __future__ import annotations

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
