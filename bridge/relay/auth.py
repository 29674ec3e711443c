"""Who may use the relay: client keys, node tokens and browser session cookies, and the decision
for one request (:meth:`Authenticator.check`), returned as a value the caller answers from.

Keys are random (``bk_<id>_<secret>``, 190+ bits), so a single SHA-256 is the right hash: there is
nothing to brute-force that a slow KDF would protect. Every comparison of a presented secret goes
through :func:`hmac.compare_digest`. Nothing here logs a secret.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_address

from ..httprules import COOKIE_NAME, cookie, presented_keys
from ..ratelimit import FailureLimiter, RateLimiter
from .store import Store

log = logging.getLogger("bridge.relay")

KEY_PREFIX = "bk_"


def new_key() -> tuple[str, str]:
    """A fresh client key and its public id: ``(key, id)``."""
    key_id = secrets.token_hex(4)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}", key_id


def new_token() -> str:
    return secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(presented: str, expected: str) -> bool:
    """Constant-time comparison of two secrets."""
    return hmac.compare_digest(presented.encode(), expected.encode())


class KeyRing:
    """The client keys the relay accepts: from ``BRIDGE_API_KEYS`` and from the store (hashed)."""

    def __init__(self, store: Store, static_keys: Iterable[str] = ()) -> None:
        self.store = store
        # Each key from the environment gets its own id (a hash prefix, not secret), so that what
        # belongs to a key (jobs, idempotent answers) is never shared with another.
        self._static = {hash_key(k): f"env-{hash_key(k)[:8]}" for k in static_keys if k}
        self._cache: dict[str, str] | None = None
        self._loaded_at = 0.0

    def refresh(self) -> None:
        self._cache = None

    def check(self, presented: str) -> str | None:
        """The id of the key presented, or None. Constant-time in the secret's content."""
        if not presented:
            return None
        return self._lookup(hash_key(presented))

    def _lookup(self, digest: str) -> str | None:
        found: str | None = None
        for known, key_id in self._known().items():  # compare against all: no early exit
            if hmac.compare_digest(digest, known):
                found = key_id
        return found

    def _known(self) -> dict[str, str]:
        # Read again every 2 s: a key made with `bridge keys add` works, and a revoked one stops
        # working, on a running relay within 2 s.
        if self._cache is None or time.monotonic() - self._loaded_at > 2.0:
            self._cache = {**self._static, **self.store.key_hashes()}
            self._loaded_at = time.monotonic()
        return self._cache

    def has_id(self, key_id: str) -> bool:
        """Whether a key with this id is still valid (a cookie outlives no revoked key)."""
        return key_id in self._known().values()

    def __len__(self) -> int:
        return len(self._known())


class CookieSigner:
    """Signed, expiring browser sessions: ``<key id>.<expiry>.<hmac>``, never the key itself."""

    def __init__(self, secret: str, max_age: int = 7 * 24 * 3600) -> None:
        self._secret = secret.encode()
        self.max_age = max_age

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, key_id: str, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.max_age)
        payload = f"{key_id}.{expiry}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, value: str, now: float | None = None) -> str | None:
        """The key id inside a valid, unexpired cookie, else None."""
        try:
            key_id, expiry, mac = value.rsplit(".", 2)
            expires = int(expiry)
        except ValueError:
            return None
        if not hmac.compare_digest(mac, self._mac(f"{key_id}.{expiry}")):
            return None
        if expires < (time.time() if now is None else now):
            return None
        return key_id


@dataclass(slots=True)
class Granted:
    """The request may go on, on behalf of the client key ``key_id``, presented ``how``
    (``cookie``, ``bearer`` or ``header``)."""

    how: str
    key_id: str


@dataclass(slots=True)
class Refused:
    """The request may not go on: 401 (no valid key presented) or 429 with ``retry_after`` seconds
    and the ``reason`` the client is told (too many failures from its address, or its key's rate)."""

    status: int
    retry_after: int = 0
    reason: str = ""


#: The 429 of an address that failed too often.
TOO_MANY_FAILURES = "too many failed attempts from this address; wait a minute"
KEY_RATE_EXCEEDED = "rate limit of this client key exceeded; slow down"


class KeyRates:
    """Each client key's request rate: a token bucket of ``rate`` requests a second (bursts of
    ``burst``, 0: ten times the rate) per key id. A rate of 0 lets everything through."""

    def __init__(self, rate: float = 0.0, burst: int = 0) -> None:
        self.rate = rate
        self.burst = burst or max(1, int(rate * 10))
        self._buckets: dict[str, RateLimiter] = {}

    def refusal(self, key_id: str) -> Refused | None:
        """None when the key may make one more request now, else the 429 it gets."""
        if self.rate <= 0:
            return None
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = RateLimiter(self.rate, self.burst)
        if bucket.allow():
            return None
        return Refused(429, max(1, math.ceil(1 / self.rate)), KEY_RATE_EXCEEDED)


KEY_STREAMS_EXCEEDED = "too many requests in flight for this client key; retry shortly"


class KeyStreams:
    """Streams each client key has open at once (requests in flight, client WebSockets, running
    jobs): at most ``limit`` per key id (0: no limit), so one key cannot take all of a bridge's
    streams. :meth:`acquire` says whether one more may open; every acquire is paired with a
    :meth:`release`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: dict[str, int] = {}
        self._freed: asyncio.Event | None = None

    def acquire(self, key_id: str) -> Refused | None:
        """None when ``key_id`` may open one more stream now (it is counted), else its 429."""
        count = self._open.get(key_id, 0)
        if self.limit and count >= self.limit:
            return Refused(429, 1, KEY_STREAMS_EXCEEDED)
        self._open[key_id] = count + 1
        return None

    async def wait(self, key_id: str) -> None:
        """Acquire a stream for ``key_id``, waiting for one of its own to end when it has none
        left (a job waits its turn rather than being refused: the job quota bounds how many wait)."""
        while self.acquire(key_id) is not None:
            if self._freed is None:
                self._freed = asyncio.Event()
            await self._freed.wait()

    def release(self, key_id: str) -> None:
        count = self._open.get(key_id, 0) - 1
        if count > 0:
            self._open[key_id] = count
        else:
            self._open.pop(key_id, None)
        if self._freed is not None:
            self._freed.set()
            self._freed = None

    def open(self, key_id: str) -> int:
        return self._open.get(key_id, 0)


class Authenticator:
    """Decides, for the headers of one request from one address, whether it is a client's: a valid
    ``bridge_session`` cookie, else a client key (``Authorization: Bearer``, ``X-Bridge-Key``).

    The credential is checked first; the failure limiter is consulted only for a wrong one: a wrong
    key from an address over its limit gets 429 (so guessing gains nothing), a right key is always
    accepted (an outsider's failures never lock out a user, docs/security.md §7). Client failures
    (``failures``) and node-token failures (``node_failures``) are counted apart, each per client
    address (:func:`client_address`, believing ``X-Forwarded-For`` only from ``trusted_proxies``).
    A granted key over its rate is refused."""

    def __init__(
        self,
        keys: KeyRing,
        cookies: CookieSigner,
        failures: FailureLimiter,
        rates: KeyRates,
        *,
        node_failures: FailureLimiter | None = None,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.keys = keys
        self.cookies = cookies
        self.failures = failures
        self.node_failures = node_failures or FailureLimiter(failures.limit, failures.window)
        self.rates = rates
        self.trusted_proxies = trusted_proxies

    def address(self, peer: str, headers: list[tuple[str, str]]) -> str:
        """The address failures of a request from ``peer`` with these headers count against."""
        return client_address(peer or "unknown", headers, self.trusted_proxies)

    def check(self, headers: list[tuple[str, str]], address: str) -> Granted | Refused:
        value = cookie(headers, COOKIE_NAME)
        if value:
            key_id = self.cookies.verify(value)
            if key_id is not None and self.keys.has_id(key_id):
                return self.rates.refusal(key_id) or Granted("cookie", key_id)
        presented = presented_keys(headers)
        if not presented:
            return Refused(401)
        for how, key in presented:
            key_id = self.keys.check(key)
            if key_id is not None:
                return self.rates.refusal(key_id) or Granted(how, key_id)
        return self.wrong_key(address)

    def wrong_key(self, address: str) -> Refused:
        """A wrong client key (or login) from ``address``: 429 once it is over its limit, else
        counted and 401."""
        retry = self.failures.retry_after(address)
        if retry:
            return Refused(429, retry, TOO_MANY_FAILURES)
        self.failures.failed(address)
        log.info("wrong client key from %s", address)
        return Refused(401)


Network = IPv4Network | IPv6Network


def client_address(peer: str, headers: list[tuple[str, str]], trusted: tuple[Network, ...]) -> str:
    """The client's address as far as the relay can tell: ``peer`` itself, unless ``peer`` is a
    configured proxy (``--trusted-proxy``); then the rightmost ``X-Forwarded-For`` entry that is not
    itself a trusted proxy (entries left of it were written by the client and prove nothing). A
    peer that is not trusted cannot choose the address its failures count against."""
    if not trusted or not _in(peer, trusted):
        return peer
    forwarded = [a.strip() for v in _all(headers, "x-forwarded-for") for a in v.split(",")]
    for entry in reversed(forwarded):
        if not entry:
            continue
        if not _in(entry, trusted):
            return entry
    return peer


def _all(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name]


def _in(address: str, networks: tuple[Network, ...]) -> bool:
    try:
        ip = ip_address(address.strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == n.version and ip in n for n in networks)
