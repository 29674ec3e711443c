from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .procs import Bridge, Proc, Relay, start_upstream


@pytest.fixture(scope="session")
def upstream() -> Iterator[str]:
    """A real HTTP server on loopback: the stand-in Ollama API plus test endpoints."""
    proc, url = start_upstream()
    yield url
    proc.stop()


@pytest.fixture(scope="session")
def stack(upstream: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Relay]:
    """One relay and one bridge shared by the read-only tests; routes ``ollama`` and ``up`` both
    lead to the upstream, and ``ollama`` is served at the root as well. Its tests load the tunnel
    with hundreds of streams of one key at once, so the per-key stream limit (--key-streams, 64 by
    default; tests/test_security_limits.py checks it) is raised here."""
    relay = Relay(tmp_path_factory.mktemp("relay"), "--default-route", "ollama", "--key-streams", "1024")
    bridge = Bridge(relay, {"ollama": upstream, "up": upstream, "dead": "http://127.0.0.1:9"})
    relay.bridge_pid = bridge.proc.popen.pid
    yield relay
    bridge.stop()
    relay.proc.stop()
    _assert_no_secret_logged(relay.proc, bridge.proc)


@pytest.fixture
def make_relay(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Start relays of this test's own (stopped at the end)."""
    made: list[Relay] = []

    def make(*extra: str, data_dir: Path | None = None, **kw: Any) -> Relay:
        relay = Relay(data_dir or tmp_path / "relay", *extra, **kw)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.proc.stop()


@pytest.fixture
def make_bridge() -> Iterator[Callable[..., Bridge]]:
    made: list[Bridge] = []

    def make(relay: Relay, routes: dict[str, str], *extra: str, wait: bool = True) -> Bridge:
        bridge = Bridge(relay, routes, *extra, wait=wait)
        made.append(bridge)
        return bridge

    yield make
    for bridge in made:
        bridge.stop()


def _assert_no_secret_logged(*procs: Proc) -> None:
    from .procs import API_KEY, NODE_TOKEN

    for proc in procs:
        out = proc.output
        assert NODE_TOKEN not in out, f"{proc.name} logged the node token"
        assert API_KEY not in out, f"{proc.name} logged a client key"
        assert API_KEY.split("_")[-1] not in out
