"""Shared fixtures, and the rule that a skip fails.

Every test checks something README.md promises, so a test that skips is reported as a failure
(with the skip's reason), unless it is marked ``@pytest.mark.may_skip(reason="...")``: a test that
cannot run on some machines for a reason outside the project (no root for network namespaces, a
kernel without namespaces or netem). A conformance test of an extension that the spec's table
(docs/spec/extensions.toml) says a relay lacks is marked so by tests/conformance/conftest.py. An
expected failure (xfail) is not a skip. CI prints every skip's reason (``-rfEs`` in pyproject.toml).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
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


def _skip_reason(report: pytest.CollectReport | pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _may_skip(node: pytest.Item | pytest.Collector) -> bool:
    return node.get_closest_marker("may_skip") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("may_skip")
        if marker is not None and not str(marker.kwargs.get("reason", "")).strip():
            raise pytest.UsageError(f"{item.nodeid}: may_skip needs reason=... (why it may not run)")


def _as_failure(report: pytest.CollectReport | pytest.TestReport, nodeid: str) -> None:
    report.outcome = "failed"
    report.longrepr = (
        f"{nodeid} skipped ({_skip_reason(report)}), but it checks what README.md promises: a skip "
        "fails here. Run the set-up step it names, or mark the test "
        '@pytest.mark.may_skip(reason="...") if it may legitimately not run on some machines.'
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and not _may_skip(item):
        _as_failure(report, item.nodeid)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(
    collector: pytest.Collector,
) -> Generator[None, pytest.CollectReport, pytest.CollectReport]:
    report = yield
    # A whole module skipped (pytest.skip(allow_module_level=True), importorskip) fails the same way.
    if report.skipped and isinstance(collector, pytest.Module) and not _may_skip(collector):
        _as_failure(report, collector.nodeid)
    return report
