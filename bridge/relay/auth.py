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

from ..httprules import COOKIE_NAME, cookies, header, presented_keys
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
    """Signed, expiring browser sessions: ``<key id>.<session id>.<expiry>.<hmac>``, never the key
    itself. The session id names a session the relay keeps (:class:`SessionBook`): a signed cookie
    is not enough once its session ended. A cookie of the older form ``<key id>.<expiry>.<hmac>``
    is refused (one more login)."""

    def __init__(self, secret: str, max_age: int = 7 * 24 * 3600) -> None:
        self._secret = secret.encode()
        self.max_age = max_age

    def _mac(self, payload: str) -> str:
        digest = hmac.new(self._secret, payload.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def issue(self, key_id: str, session_id: str, now: float | None = None) -> str:
        expiry = int((time.time() if now is None else now) + self.max_age)
        payload = f"{key_id}.{session_id}.{expiry}"
        return f"{payload}.{self._mac(payload)}"

    def verify(self, value: str, now: float | None = None) -> tuple[str, str] | None:
        """``(key id, session id)`` inside a valid, unexpired cookie, else None. Any text is just
        invalid (compared as bytes: a non-ASCII value cannot raise)."""
        parts = value.split(".")
        if len(parts) != 4 or not parts[2].isascii() or not parts[2].isdigit():
            return None
        key_id, session_id, expiry, mac = parts
        expected = self._mac(f"{key_id}.{session_id}.{expiry}")
        if not hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected.encode()):
            return None
        if int(expiry) < (time.time() if now is None else now):
            return None
        return key_id, session_id


#: Live browser sessions one key may hold; a new login past it ends the key's oldest.
SESSIONS_PER_KEY = 1000


class SessionBook:
    """The browser sessions the relay keeps (in the store): a login starts one, logout ends it,
    revoking a key or ``bridge sessions revoke`` ends many. Read again every 2 s, so that a CLI
    revocation reaches a running relay within 2 s (as for keys); this relay's own logins and
    logouts take effect at once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._live: dict[str, str] | None = None
        self._loaded_at = 0.0

    def _sessions(self) -> dict[str, str]:
        if self._live is None or time.monotonic() - self._loaded_at > 2.0:
            self._live = self.store.live_sessions()
            self._loaded_at = time.monotonic()
        return self._live

    def start(self, key_id: str, expires: float) -> str:
        session_id = secrets.token_urlsafe(16).replace(".", "_")
        displaced = self.store.add_session(session_id, key_id, expires, keep=SESSIONS_PER_KEY)
        if self._live is not None:  # kept up to date here, not read again whole after each login
            self._live[session_id] = key_id
            for gone in displaced:
                self._live.pop(gone, None)
        return session_id

    def live(self, session_id: str, key_id: str) -> bool:
        return self._sessions().get(session_id) == key_id

    def end(self, session_id: str) -> None:
        self.store.end_sessions(session_id=session_id)
        self._sessions().pop(session_id, None)


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
        sessions: SessionBook | None = None,
        *,
        node_failures: FailureLimiter | None = None,
        trusted_proxies: tuple[Network, ...] = (),
    ) -> None:
        self.keys = keys
        self.cookies = cookies
        self.failures = failures
        self.node_failures = node_failures or FailureLimiter(failures.limit, failures.window)
        self.rates = rates
        self.sessions = sessions if sessions is not None else SessionBook(keys.store)
        self.trusted_proxies = trusted_proxies

    def session(self, headers: list[tuple[str, str]]) -> tuple[str, str] | None:
        """``(key id, session id)`` of the first valid ``bridge_session`` cookie (browsers send
        every cookie that matches): signature, expiry, key, then the session on the relay."""
        for value in cookies(headers, COOKIE_NAME)[:8]:
            found = self.cookies.verify(value)
            if found is not None and self.keys.has_id(found[0]) and self.sessions.live(found[1], found[0]):
                return found
        return None

    def address(self, peer: str, headers: list[tuple[str, str]]) -> str:
        """The address failures of a request from ``peer`` with these headers count against."""
        return client_address(peer or "unknown", headers, self.trusted_proxies)

    def check(self, headers: list[tuple[str, str]], address: str) -> Granted | Refused:
        found = self.session(headers)
        if found is not None:
            return self.rates.refusal(found[0]) or Granted("cookie", found[0])
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


#: The methods a browser sends from any page without asking (navigations, images): not checked.
SAFE_METHODS = frozenset({"GET", "HEAD"})


def needs_origin(method: str, websocket: bool, how: str) -> bool:
    """Whether a request's ``Origin`` must be one of the relay's own (docs/security.md §6): a
    request authenticated by the session cookie (``how``) that writes (any method but GET and
    HEAD) or opens a WebSocket. A program with a key is served whatever page it runs in."""
    return how == "cookie" and (websocket or method.upper() not in SAFE_METHODS)


def origin_allowed(origin: str | None, host: str, allowed: Iterable[str] = ()) -> bool:
    """Whether a request from a page at ``origin`` may go on: no Origin (a program, or a browser
    where it sends none), the relay's own (``http://`` or ``https://`` + the ``host`` the request
    was sent to, ASCII case-insensitive, exactly), or one of ``allowed`` (``--allowed-origin``).
    ``null`` (a sandboxed or privacy-sensitive page) and every other value are refused."""
    value = (origin or "").strip(" \t").lower()
    if not value:
        return True
    host = host.strip(" \t").lower()
    own = {f"http://{host}", f"https://{host}"} if host else set()
    return value in own or value in {a.strip().rstrip("/").lower() for a in allowed}


def origin_refusal(
    headers: list[tuple[str, str]],
    *,
    method: str,
    websocket: bool,
    how: str,
    allowed: Iterable[str],
    host: str | None = None,
) -> str | None:
    """The 403's words when this request must not go on for its ``Origin``, else None (``host``:
    the host the browser addressed, :func:`public_host`; default the request's ``Host``)."""
    if not needs_origin(method, websocket, how):
        return None
    if host is None:
        host = header(headers, "host") or ""
    return foreign_origin(headers, host, allowed)


def foreign_origin(headers: list[tuple[str, str]], host: str, allowed: Iterable[str]) -> str | None:
    """The 403's words when the request's ``Origin`` is not allowed (:func:`origin_allowed`), else
    None: for a request that must come from the relay's own pages (a cookie's write, a login)."""
    origin = header(headers, "origin")
    if origin_allowed(origin, host, allowed):
        return None
    return f"cross-origin request refused: Origin {origin} is not this relay's"


Network = IPv4Network | IPv6Network


def public_host(peer: str, headers: list[tuple[str, str]], trusted: tuple[Network, ...]) -> str:
    """The host a browser addressed: a configured proxy's ``X-Forwarded-Host`` (its last entry:
    the one that proxy wrote) when ``peer`` is one (``--trusted-proxy``), else ``Host``. Behind a
    proxy that rewrites ``Host`` the relay's own origin is then still recognised; a peer that is
    not a trusted proxy cannot choose it."""
    if trusted and _in(peer, trusted):
        forwarded = [h.strip() for v in _all(headers, "x-forwarded-host") for h in v.split(",")]
        if forwarded and forwarded[-1]:
            return forwarded[-1]
    return header(headers, "host") or ""


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
