"""Who the relay lets in: :meth:`bridge.relay.auth.Authenticator.check` for the headers of one
request from one address, a value (Granted or Refused) the caller answers from."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from bridge.config import RelayConfig, parse_networks
from bridge.errors import ConfigError
from bridge.ratelimit import FailureLimiter
from bridge.relay import auth as auth_module
from bridge.relay.auth import (
    Authenticator,
    CookieSigner,
    Granted,
    KeyRates,
    KeyRing,
    Refused,
    client_address,
    hash_key,
    needs_origin,
    new_key,
    origin_allowed,
    origin_refusal,
    public_host,
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


def login(a: Authenticator, key_id: str) -> str:
    """The cookie of a new browser session of ``key_id`` (as the login form makes it)."""
    return a.cookies.issue(key_id, a.sessions.start(key_id, time.time() + a.cookies.max_age))


def bearer(key: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {key}")]


def test_each_way_to_present_a_key(store: Store) -> None:
    a = auth(store)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    assert a.check(bearer(key), "1.2.3.4") == Granted("bearer", key_id)
    assert a.check([("Authorization", f"bEaReR  {key} ")], "1.2.3.4") == Granted("bearer", key_id)
    assert a.check([("x-bridge-key", key)], "1.2.3.4") == Granted("header", key_id)
    cookie = login(a, key_id)
    assert a.check([("cookie", f"other=1; bridge_session={cookie}")], "1.2.3.4") == Granted("cookie", key_id)
    env = a.check(bearer(KEY), "1.2.3.4")
    assert isinstance(env, Granted) and env.key_id.startswith("env-")  # an id of its own, never shared
    assert a.check([], "1.2.3.4") == Refused(401)
    assert a.check(bearer(""), "1.2.3.4") == Refused(401)


def test_a_cookie_dies_with_its_key(store: Store) -> None:
    a = auth(store)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    cookie = login(a, key_id)
    store.revoke_key(key_id)
    a.keys.refresh()
    assert a.check([("cookie", f"bridge_session={cookie}")], "1.2.3.4") == Refused(401)
    assert a.check([("cookie", "bridge_session=forged.9999999999.mac")], "1.2.3.4") == Refused(401)


def test_guessing_is_limited_but_a_right_credential_is_never_locked_out(store: Store) -> None:
    a = auth(store, limit=3)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    cookie = login(a, key_id)
    for _ in range(3):
        assert a.check(bearer("bk_wrong"), "6.6.6.6") == Refused(401)
    refused = a.check(bearer("bk_wrong-again"), "6.6.6.6")
    assert isinstance(refused, Refused) and refused.status == 429 and refused.retry_after > 0
    assert "too many failed attempts" in refused.reason
    # The credential is checked first: the right key from the same address is accepted (guessing
    # must be hopeless by the key's size, not by the limiter) ...
    assert a.check(bearer(key), "6.6.6.6") == Granted("bearer", key_id)
    assert a.check(bearer(key), "7.7.7.7") == Granted("bearer", key_id)  # another address
    assert a.check([("cookie", f"bridge_session={cookie}")], "6.6.6.6") == Granted("cookie", key_id)
    # ... and wrong node tokens are counted apart from client keys.
    assert a.node_failures.retry_after("6.6.6.6") == 0
    for _ in range(3):
        a.node_failures.failed("8.8.8.8")
    assert a.check(bearer("bk_wrong"), "8.8.8.8") == Refused(401)


def test_a_key_over_its_rate_is_refused_with_when_to_retry(store: Store) -> None:
    a = Authenticator(KeyRing(store, [KEY]), CookieSigner("s"), FailureLimiter(10), KeyRates(0.5, 2))
    assert isinstance(a.check(bearer(KEY), "1.2.3.4"), Granted)
    assert isinstance(a.check(bearer(KEY), "1.2.3.4"), Granted)
    refused = a.check(bearer(KEY), "1.2.3.4")
    assert refused == Refused(429, 2, "rate limit of this client key exceeded; slow down")


def test_a_session_ends_on_logout_and_with_its_key_and_for_everyone(store: Store, tmp_path: Path) -> None:
    a = auth(store)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    first, second = login(a, key_id), login(a, key_id)
    jar = [("cookie", f"bridge_session={first}")]
    assert a.check(jar, "1.2.3.4") == Granted("cookie", key_id)
    found = a.session(jar)
    assert found is not None and found[0] == key_id
    a.sessions.end(found[1])  # logout: this session only, at once
    assert a.check(jar, "1.2.3.4") == Refused(401)
    assert a.check([("cookie", f"bridge_session={second}")], "1.2.3.4") == Granted("cookie", key_id)
    # Another relay process on the same store (a restart) sees the same sessions.
    again = auth(Store(tmp_path))
    assert again.check(jar, "1.2.3.4") == Refused(401)
    assert again.check([("cookie", f"bridge_session={second}")], "1.2.3.4") == Granted("cookie", key_id)
    assert store.end_sessions() == 1  # `bridge sessions revoke --all`
    assert auth(store).check([("cookie", f"bridge_session={second}")], "1.2.3.4") == Refused(401)


def test_a_key_keeps_at_most_1000_live_sessions(store: Store) -> None:
    a = auth(store)
    cookies = [login(a, "k1") for _ in range(1001)]
    a.keys.has_id = lambda key_id: True  # type: ignore[method-assign]
    assert a.check([("cookie", f"bridge_session={cookies[0]}")], "1.2.3.4") == Refused(401)
    assert a.check([("cookie", f"bridge_session={cookies[1]}")], "1.2.3.4") == Granted("cookie", "k1")
    assert len(store.live_sessions()) == 1000


def rows(store: Store) -> int:
    return int(store.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


def test_a_session_that_ends_leaves_the_store_and_its_cookie_stays_refused(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Logout, a newer login past the cap, revocation: the session's row is deleted at once (it
    was kept for a week, so 3,000 logins of one key left 2,000 dead rows that every later login
    scanned); a cookie naming a session the store lacks is refused, now and after a restart."""
    a = auth(store)
    key, key_id = new_key()
    store.add_key(key_id, hash_key(key), "test")
    cookies = [login(a, key_id) for _ in range(4)]
    found = a.session([("cookie", f"bridge_session={cookies[0]}")])
    assert found is not None
    a.sessions.end(found[1])  # logout
    assert rows(store) == 3
    assert a.check([("cookie", f"bridge_session={cookies[0]}")], "1.2.3.4") == Refused(401)
    monkeypatch.setattr(auth_module, "SESSIONS_PER_KEY", 2)
    newest = login(a, key_id)  # past a cap of 2: the two oldest end, at once for this relay too
    kept = store.live_sessions()
    assert rows(store) == 2 == len(kept)
    for cookie, granted in zip([*cookies[1:], newest], (False, False, True, True), strict=True):
        jar = [("cookie", f"bridge_session={cookie}")]
        assert a.check(jar, "1.2.3.4") == (Granted("cookie", key_id) if granted else Refused(401))
    store.add_session("expired", "k2", time.time() - 1)
    store.add_session("other", "k2", time.time() + 60)  # a login sweeps expired sessions
    assert set(store.live_sessions()) == {*kept, "other"} and rows(store) == 3
    assert store.end_sessions(key_id=key_id) == 2 and rows(store) == 1  # `bridge keys revoke`
    restarted = auth(Store(tmp_path))
    for cookie in [*cookies, newest]:
        assert restarted.check([("cookie", f"bridge_session={cookie}")], "1.2.3.4") == Refused(401)


OLD_SESSIONS = """
CREATE TABLE sessions (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, created REAL NOT NULL,
    expires REAL NOT NULL, ended REAL);
"""


def test_a_keys_sessions_are_found_by_an_index_also_in_an_older_database(tmp_path: Path) -> None:
    """A login counts and ends the key's oldest sessions, `--key` revocation finds the key's: by an
    index on ``key_id`` (there was none: each login scanned the whole table). A database made
    before gains it when opened, and loses the ended rows an older relay kept."""
    later = time.time() + 3600
    db = sqlite3.connect(tmp_path / "relay.sqlite3")
    db.executescript(OLD_SESSIONS)
    db.executemany(
        "INSERT INTO sessions VALUES(?, 'k1', 1.0, ?, ?)", [("live", later, None), ("ended", later, 2.0)]
    )
    db.commit()
    db.close()
    store = Store(tmp_path)
    assert store.live_sessions() == {"live": "k1"} and rows(store) == 1
    for query in (
        "SELECT COUNT(*) FROM sessions WHERE key_id = ?",
        "SELECT id FROM sessions WHERE key_id = ? ORDER BY created, rowid LIMIT 1",
        "DELETE FROM sessions WHERE key_id = ?",
    ):
        plan = " ".join(str(r[-1]) for r in store.db.execute(f"EXPLAIN QUERY PLAN {query}", ("k1",)))
        assert "INDEX sessions_by_key" in plan and "TEMP B-TREE" not in plan, f"{query}: {plan}"
    plan = " ".join(
        str(r[-1]) for r in store.db.execute("EXPLAIN QUERY PLAN DELETE FROM sessions WHERE expires <= 1")
    )
    assert "INDEX sessions_by_expiry" in plan, plan


@pytest.mark.parametrize(
    "value",
    [
        "k1.s.9999999999.\u00e9",
        "\u20ac",
        "k1.s.\u0661\u0662.mac",
        "k1.9999999999.mac",
        "....",
        "",
        "k1.s.-1.m",
    ],
)
def test_any_cookie_value_is_just_invalid(store: Store, value: str) -> None:
    assert auth(store).check([("cookie", f"bridge_session={value}")], "1.2.3.4") == Refused(401)


def test_the_first_valid_session_cookie_counts_by_its_parsed_name(store: Store) -> None:
    a = auth(store)
    cookie = login(a, "env")
    a.keys.has_id = lambda key_id: True  # type: ignore[method-assign]
    jar = [("cookie", f"bridge_session=k.s.1.\u00e9;  bridge_session\t= {cookie} ; x=1")]
    assert a.check(jar, "1.2.3.4") == Granted("cookie", "env")


def test_the_host_a_browser_addressed_comes_from_a_trusted_proxy_only() -> None:
    proxies = parse_networks(["127.0.0.1"])
    behind = [("host", "127.0.0.1:8000"), ("x-forwarded-host", "evil.example, relay.example")]
    # A configured proxy's X-Forwarded-Host (the entry it wrote: the last) is the relay's origin ...
    assert public_host("127.0.0.1", behind, proxies) == "relay.example"
    host = public_host("127.0.0.1", behind, proxies)
    writes = [*behind, ("origin", "https://relay.example")]
    assert origin_refusal(writes, method="POST", websocket=False, how="cookie", allowed=(), host=host) is None
    # ... any other peer's is only words: the Host it sent counts.
    assert public_host("203.0.113.9", behind, proxies) == "127.0.0.1:8000"
    assert public_host("127.0.0.1", behind, ()) == "127.0.0.1:8000"
    assert public_host("127.0.0.1", [("host", "h")], proxies) == "h"


def test_the_origin_decision() -> None:
    # Only cookie-authenticated writes and WebSockets are checked.
    assert needs_origin("POST", False, "cookie") and needs_origin("GET", True, "cookie")
    assert needs_origin("OPTIONS", False, "cookie") and needs_origin("delete", False, "cookie")
    assert not needs_origin("GET", False, "cookie") and not needs_origin("HEAD", False, "cookie")
    assert not needs_origin("POST", False, "bearer") and not needs_origin("GET", True, "header")
    host = "relay.example:8443"
    for origin in (None, "", " ", "https://relay.example:8443", "HTTP://Relay.Example:8443"):
        assert origin_allowed(origin, host), origin
    for origin in (
        "null",
        "http://evil.example",
        "https://relay.example",  # another port: another origin
        "https://relay.example:8443/",
        "https://relay.example:8443.evil.example",
        "ws://relay.example:8443",
        "https://x@relay.example:8443",
    ):
        assert not origin_allowed(origin, host), origin
    assert origin_allowed("https://chat.example", host, ["https://chat.example/"])
    assert not origin_allowed("https://chat.example", "", [])
    writes = [("host", host), ("origin", "http://evil.example")]
    refused = origin_refusal(writes, method="POST", websocket=False, how="cookie", allowed=())
    assert refused == "cross-origin request refused: Origin http://evil.example is not this relay's"
    assert origin_refusal(writes, method="POST", websocket=False, how="bearer", allowed=()) is None


def test_failures_count_against_the_client_a_configured_proxy_names() -> None:
    proxies = parse_networks(["127.0.0.1", "10.0.0.0/8"])
    forwarded = [("x-forwarded-for", "9.9.9.9, 203.0.113.7, 10.0.0.7")]
    # The rightmost entry that is not a trusted proxy; entries left of it are the client's words.
    assert client_address("127.0.0.1", forwarded, proxies) == "203.0.113.7"
    assert client_address("::ffff:127.0.0.1", forwarded, proxies) == "203.0.113.7"
    # An unconfigured peer (loopback or not) cannot choose the address its failures count against.
    assert client_address("203.0.113.5", forwarded, proxies) == "203.0.113.5"
    assert client_address("127.0.0.1", forwarded, ()) == "127.0.0.1"
    assert client_address("127.0.0.2", forwarded, proxies) == "127.0.0.2"
    # No header, or only proxies in it: the peer.
    assert client_address("127.0.0.1", [], proxies) == "127.0.0.1"
    assert client_address("127.0.0.1", [("X-Forwarded-For", "10.1.2.3, ")], proxies) == "127.0.0.1"
    # Several header lines are one list.
    two = [("x-forwarded-for", "1.1.1.1"), ("X-Forwarded-For", "2.2.2.2")]
    assert client_address("127.0.0.1", two, proxies) == "2.2.2.2"


def test_trusted_proxies_must_be_addresses_or_ranges() -> None:
    assert parse_networks(["127.0.0.1, ::1", "192.168.0.0/16"])[2].num_addresses == 65536
    with pytest.raises(ConfigError, match=r"trusted proxy 'proxy\.example'"):
        RelayConfig(trusted_proxies=("proxy.example",))
