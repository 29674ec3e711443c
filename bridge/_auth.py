"""Secrets: client keys, node tokens and browser session cookies.

Keys are random (``bk_<id>_<secret>``, 190+ bits), so a single SHA-256 is the right hash: there is
nothing to brute-force that a slow KDF would protect. Every comparison of a presented secret goes
through :func:`hmac.compare_digest`. Nothing here logs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable

from ._store import Store

KEY_PREFIX = "bk_"
COOKIE_NAME = "bridge_session"


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


class FailureLimiter:
    """Failed authentications per client address in a sliding window (brute force): once an address
    reached ``limit`` failures in ``window`` seconds it is refused, right secret or not, until its
    oldest failure leaves the window. At most ``max_addresses`` addresses are remembered (the
    least recently failing ones are forgotten first), so many addresses cannot grow it without bound."""

    def __init__(self, limit: int, window: float = 60.0, max_addresses: int = 4096) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, address: str, now: float) -> deque[float] | None:
        failures = self._failures.get(address)
        if failures is None:
            return None
        while failures and failures[0] <= now - self.window:
            failures.popleft()
        if not failures:
            del self._failures[address]
            return None
        return failures

    def retry_after(self, address: str, now: float | None = None) -> int:
        """Seconds until ``address`` may try again (0: it may now)."""
        if self.limit <= 0:
            return 0
        now = time.monotonic() if now is None else now
        failures = self._recent(address, now)
        if failures is None or len(failures) < self.limit:
            return 0
        return max(1, math.ceil(failures[0] + self.window - now))

    def failed(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        failures = self._recent(address, now)
        if failures is None:
            failures = self._failures[address] = deque()
        failures.append(now)
        self._failures.move_to_end(address)
        while len(self._failures) > self.max_addresses:
            self._failures.popitem(last=False)

    def __len__(self) -> int:
        return len(self._failures)
