"""Limits over time: a token bucket (a client key's request rate, the bridge's STATS frames) and a
sliding window of failures per address (guessing keys, tokens or logins)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque


class RateLimiter:
    """A token bucket: at most ``rate`` events a second on average, bursts of ``burst``."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()
        self.dropped = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        self.dropped += 1
        return False


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
