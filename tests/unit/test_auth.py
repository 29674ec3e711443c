"""Who the relay lets in: :meth:`bridge.relay.auth.Authenticator.check` for the headers of one
request from one address, a value (Granted or Refused) the caller answers from."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.ratelimit import FailureLimiter
from bridge.relay.auth import (
    Authenticator,
    CookieSigner,
    Granted,
    KeyRates,
    KeyRing,
    Refused,
    hash_key,
    limit_key,
    new_key,
)
from bridge.relay.store import Store

KEY = "bk_env00001_a-key-from-the-environment"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path)


def auth(store: Store, *, rate: float = 0.0, limit: int = 3) -> Authenticator:
    return Authenticator(
        KeyRing(store, [KEY]), CookieSigner("cookie-secret"), FailureLimiter(limit), KeyRates(rate, 0)
    )


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_each_way_to_present_a_key(store: Store) -> None:
    a = auth(store)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    assert a.check(bearer(key), "1.2.3.4") == Granted("bearer", key_id)
    assert a.check([("Authorization", f"bEaReR  {key} ")], "1.2.3.4") == Granted("bearer", key_id)
    assert a.check([("x-bridge-key", key)], "1.2.3.4") == Granted("header", key_id)
    cookie = a.cookies.issue(key_id)
    assert a.check([("cookie", f"other=1; bridge_session={cookie}")], "1.2.3.4") == Granted("cookie", key_id)
    env = a.check(bearer(KEY), "1.2.3.4")
    assert isinstance(env, Granted) and env.key_id.startswith("env-")  # an id of its own, never shared
    assert a.check([], "1.2.3.4") == Refused(401)
    assert a.check(bearer(""), "1.2.3.4") == Refused(401)


def test_a_cookie_dies_with_its_key(store: Store) -> None:
    a = auth(store)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    cookie = a.cookies.issue(key_id)
    store.revoke_key(key_id)
    a.keys.refresh()
    assert a.check([("cookie", f"bridge_session={cookie}")], "1.2.3.4") == Refused(401)
    assert a.check([("cookie", "bridge_session=forged.9999999999.mac")], "1.2.3.4") == Refused(401)


def test_guessing_locks_the_address_out_right_key_or_not(store: Store) -> None:
    a = auth(store, limit=3)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    cookie = a.cookies.issue(key_id)
    for _ in range(3):
        assert a.check(bearer("bk_wrong"), "6.6.6.6") == Refused(401)
    refused = a.check(bearer(key), "6.6.6.6")
    assert isinstance(refused, Refused) and refused.status == 429 and refused.retry_after > 0
    assert "too many failed attempts" in refused.reason
    assert a.check(bearer(key), "7.7.7.7") == Granted("bearer", key_id)  # another address
    # A signed cookie cannot be guessed: it is checked whatever the count.
    assert a.check([("cookie", f"bridge_session={cookie}")], "6.6.6.6") == Granted("cookie", key_id)


def test_a_key_over_its_rate_is_refused_with_when_to_retry(store: Store) -> None:
    a = Authenticator(KeyRing(store, [KEY]), CookieSigner("s"), FailureLimiter(10), KeyRates(0.5, 2))
    assert isinstance(a.check(bearer(KEY), "1.2.3.4"), Granted)
    assert isinstance(a.check(bearer(KEY), "1.2.3.4"), Granted)
    refused = a.check(bearer(KEY), "1.2.3.4")
    assert refused == Refused(429, 2, "rate limit of this client key exceeded; slow down")


def test_failures_count_against_the_client_behind_a_local_proxy() -> None:
    forwarded = [("x-forwarded-for", "9.9.9.9, 10.0.0.7")]
    assert limit_key("127.0.0.1", forwarded) == "10.0.0.7"  # the address the proxy appended
    assert limit_key("203.0.113.5", forwarded) == "203.0.113.5"  # a remote peer cannot choose
    assert limit_key("127.0.0.1", []) == "127.0.0.1"
