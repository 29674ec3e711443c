"""Who may use the relay: client keys, node tokens and browser session cookies, and the decision
for one request (:meth:`Authenticator.check`), returned as a value the caller answers from.

Keys are random (``bk_<id>_<secret>``, 190+ bits), so a single SHA-256 is the right hash: there is
nothing to brute-force that a slow KDF would protect. Every comparison of a presented secret goes
through :func:`hmac.compare_digest`. Nothing here logs a secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass

from ..httprules import COOKIE_NAME, cookie, header, is_loopback, presented_keys
from ..ratelimit import FailureLimiter, RateLimiter
from .store import Store

log = logging.getLogger("bridge.relay")

KEY_PREFIX = "bk_"


def new_key() -> tuple[str, str]:
    """A fresh client key and its public id: ``(key, id)``."""
    key_id = secrets.token_hex(4)
    return f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(24)}", key_id


def static_key_id(key: str) -> str:
    """The id of a key given in ``BRIDGE_API_KEYS`` (a hash prefix, not secret)."""
    return f"env-{hash_key(key)[:8]}"


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
        self._static = {hash_key(k): static_key_id(k) for k in static_keys if k}
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


class Authenticator:
    """Decides, for the headers of one request from one address, whether it is a client's: a valid
    ``bridge_session`` cookie, else a client key (``Authorization: Bearer``, ``X-Bridge-Key``).

    A key that is presented and wrong counts as a failure of the address; an address with too many
    failures has its keys refused unchecked (so guessing gains nothing). Signed cookies cannot be
    guessed: they are checked whatever the count. A granted key over its rate is refused."""

    def __init__(
        self, keys: KeyRing, cookies: CookieSigner, failures: FailureLimiter, rates: KeyRates
    ) -> None:
        self.keys = keys
        self.cookies = cookies
        self.failures = failures
        self.rates = rates

    def check(self, headers: list[tuple[str, str]], address: str) -> Granted | Refused:
        value = cookie(headers, COOKIE_NAME)
        if value:
            key_id = self.cookies.verify(value)
            if key_id is not None and self.keys.has_id(key_id):
                return self.rates.refusal(key_id) or Granted("cookie", key_id)
        presented = presented_keys(headers)
        if not presented:
            return Refused(401)
        retry = self.failures.retry_after(address)
        if retry:
            return Refused(429, retry, TOO_MANY_FAILURES)
        for how, key in presented:
            key_id = self.keys.check(key)
            if key_id is not None:
                return self.rates.refusal(key_id) or Granted(how, key_id)
        self.failures.failed(address)
        log.info("wrong client key from %s", address)
        return Refused(401)


def limit_key(peer: str, headers: list[tuple[str, str]]) -> str:
    """The address failed authentications are counted against: the client's, or, behind a proxy
    on the same machine (Caddy, nginx: the peer is a loopback address), the address that proxy
    appended to ``X-Forwarded-For``, so that one client guessing keys does not lock out everyone
    who comes through the proxy. A peer elsewhere cannot choose its key this way."""
    if is_loopback(peer):
        forwarded = header(headers, "x-forwarded-for")
        if forwarded and forwarded.split(",")[-1].strip():
            return forwarded.split(",")[-1].strip()
    return peer
