"""What every room of the relay shares: its settings, its store, the connected nodes, its counters."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RelayConfig
from .metrics import RelayMetrics
from .pool import Pool
from .store import Store


@dataclass(frozen=True, slots=True)
class RelayState:
    config: RelayConfig
    store: Store
    pool: Pool
    metrics: RelayMetrics
