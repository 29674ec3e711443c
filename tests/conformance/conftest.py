"""Fixtures that start either relay: every test in this package runs once against the Python relay
and once against the Cloudflare relay (marked ``workerd``; it fails, never skips, when
``scripts/setup.d/40-workerd.sh`` has not been run)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import _assert_no_secret_logged
from ..procs import Bridge, Relay
from .deployed import DeployedWorkerdRelay
from .workerd import WorkerdRelay

RELAYS = [
    pytest.param("python", id="python"),
    pytest.param("cloudflare", id="cloudflare", marks=pytest.mark.workerd),
]
#: The tests with one relay and bridge for the module also run against the Worker exactly as
#: ``bridge deploy cloudflare`` uploads it (the shipped bundle, the configuration and secrets it sets).
WITH_DEPLOYED = [
    *RELAYS,
    pytest.param("cloudflare-deployed", id="cloudflare-deployed", marks=pytest.mark.workerd),
]
#: The bridges started for each relay, whose logs a failing test shows.
_BRIDGES: dict[int, list[Bridge]] = {}
#: Seconds a request waits for a bridge in the tests about having none (short: the 503 test waits it out).
SHORT_GRACE = 4.0


def start_relay(
    kind: str, data_dir: Path, *, default_route: str = "ollama", grace: float = 30, heartbeat: float = 5
) -> Relay:
    if kind == "cloudflare":
        return WorkerdRelay(data_dir, default_route=default_route, grace=grace, heartbeat=heartbeat)
    if kind == "cloudflare-deployed":
        return DeployedWorkerdRelay(data_dir, default_route=default_route, grace=grace, heartbeat=heartbeat)
    return Relay(
        data_dir, "--default-route", default_route, "--grace", str(grace), "--heartbeat", str(heartbeat)
    )


@pytest.fixture(scope="module", params=WITH_DEPLOYED)
def relay(
    request: pytest.FixtureRequest, upstream: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Relay]:
    """A relay of each kind with a bridge connected: routes ``ollama`` (also the default route)
    and ``up`` lead to the stand-in upstream, ``dead`` to a closed port."""
    kind: str = request.param
    relay = start_relay(kind, tmp_path_factory.mktemp(f"relay-{kind}"))
    bridge = Bridge(relay, {"ollama": upstream, "up": upstream, "dead": "http://127.0.0.1:9"})
    relay.bridge_pid = bridge.proc.popen.pid
    _BRIDGES[id(relay)] = [bridge]
    yield relay
    bridge.stop()
    relay.proc.stop()
    _assert_no_secret_logged(relay.proc, bridge.proc)


@pytest.fixture(params=RELAYS)
def bare_relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Relay]:
    """A relay of each kind with no bridge yet, a short grace and a 1-second heartbeat."""
    relay = start_relay(request.param, tmp_path / "relay", grace=SHORT_GRACE, heartbeat=1)
    yield relay
    relay.proc.stop()
    _assert_no_secret_logged(relay.proc)


@pytest.fixture
def bridges() -> Iterator[Callable[..., Bridge]]:
    made: list[Bridge] = []

    def make(relay: Relay, routes: dict[str, str], *extra: str, wait: bool = True) -> Bridge:
        bridge = Bridge(relay, routes, *extra, wait=wait)
        made.append(bridge)
        _BRIDGES.setdefault(id(relay), []).append(bridge)
        return bridge

    yield make
    for bridge in made:
        bridge.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A failing test shows the end of its relay's and bridges' logs (wrangler's included)."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    funcargs: dict[str, Any] = getattr(item, "funcargs", {})
    for name in ("relay", "bare_relay"):
        relay = funcargs.get(name)
        if isinstance(relay, Relay):
            for proc in [relay.proc, *(b.proc for b in _BRIDGES.get(id(relay), []))]:
                report.sections.append((f"{proc.name} log (last 60 lines)", "\n".join(proc.lines[-60:])))
