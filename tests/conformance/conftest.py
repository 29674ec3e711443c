"""Fixtures that start either relay: every test in this package runs once against the Python relay
and once against the Cloudflare relay (marked ``workerd``; it fails, never skips, when
``scripts/setup.d/40-workerd.sh`` has not been run).

A test of a named extension of docs/spec/relay.md is marked ``@pytest.mark.extension("name")``: it
runs against every relay that implements the extension and is skipped, with the reason in the
report, against one that does not, as docs/spec/extensions.toml (the spec's table) says."""

from __future__ import annotations

import contextlib
import hashlib
import tomllib
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .. import scripted_upstream
from ..conftest import _assert_no_secret_logged
from ..procs import API_KEY, NODE_TOKEN, ROOT, Bridge, Relay
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
#: The spec's table of which relay implements which extension (docs/spec/relay.md).
EXTENSIONS_FILE = ROOT / "docs" / "spec" / "extensions.toml"
EXTENSIONS: dict[str, dict[str, Any]] = {
    ext["name"]: ext for ext in tomllib.loads(EXTENSIONS_FILE.read_text(encoding="utf-8"))["extension"]
}
#: The fixtures whose parameter says which relay a test runs against.
KIND_FIXTURES = ("relay", "bare_relay", "relay_kind")
#: The bridges started for each relay, whose logs a failing test shows.
_BRIDGES: dict[int, list[Bridge]] = {}
#: Seconds a request waits for a bridge in the tests about having none (short: the 503 test waits it out).
SHORT_GRACE = 4.0


#: Settings an extension test may ask for: the Python relay's flag and the Cloudflare relay's var
#: (None: that relay has no such setting; the tests that need it are skipped there by the table).
SETTINGS: dict[str, tuple[str, str | None]] = {
    "max_body": ("--max-body", "MAX_BODY"),
    "key_rate": ("--key-rate", "KEY_RATE"),
    "key_burst": ("--key-burst", "KEY_BURST"),
    "body_timeout": ("--body-timeout", "BODY_TIMEOUT"),
    "route_port": ("--route-port", None),
    "api_keys": ("--api-keys", "CLIENT_KEY_HASHES"),
}
#: Settings the Cloudflare relay takes as secrets, and how each value becomes one: client keys are
#: kept as their SHA-256 digests only.
SECRET_SETTINGS: dict[str, Callable[[str], str]] = {
    "api_keys": lambda keys: ",".join(
        hashlib.sha256(k.strip().encode()).hexdigest() for k in keys.split(",")
    ),
}


def start_relay(
    kind: str,
    data_dir: Path,
    *,
    default_route: str = "ollama",
    grace: float = 30,
    heartbeat: float = 5,
    **settings: str,
) -> Relay:
    """A relay of ``kind`` with the common settings and any of :data:`SETTINGS`."""
    if kind == "cloudflare":
        extra_vars: dict[str, str] = {}
        secrets = {
            "NODE_TOKEN": NODE_TOKEN,
            "CLIENT_KEY_HASHES": hashlib.sha256(API_KEY.encode()).hexdigest(),
        }
        for name, value in settings.items():
            var = SETTINGS[name][1]
            if var is None:
                raise ValueError(f"the Cloudflare relay has no setting for {name}")
            if name in SECRET_SETTINGS:
                secrets[var] = SECRET_SETTINGS[name](value)
            else:
                extra_vars[var] = value
        return WorkerdRelay(
            data_dir,
            default_route=default_route,
            grace=grace,
            heartbeat=heartbeat,
            extra_vars=extra_vars,
            secrets=secrets,
        )
    if kind == "cloudflare-deployed":
        if settings:
            raise ValueError("the deployed Cloudflare relay takes its settings from its deployment")
        return DeployedWorkerdRelay(data_dir, default_route=default_route, grace=grace, heartbeat=heartbeat)
    flags = [a for name, value in settings.items() for a in (SETTINGS[name][0], value)]
    return Relay(
        data_dir,
        "--default-route",
        default_route,
        "--grace",
        str(grace),
        "--heartbeat",
        str(heartbeat),
        *flags,
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "extension(name): a test of a named relay extension (docs/spec/relay.md); skipped on a relay "
        "that does not implement it (docs/spec/extensions.toml)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip each extension test on the relays the spec's table says lack the extension."""
    for item in items:
        marker = item.get_closest_marker("extension")
        if marker is None:
            continue
        name = marker.args[0]
        if name not in EXTENSIONS:
            raise pytest.UsageError(f"{item.nodeid}: no extension {name!r} in {EXTENSIONS_FILE.name}")
        params: dict[str, Any] = getattr(getattr(item, "callspec", None), "params", {})
        kinds = [params[f] for f in KIND_FIXTURES if f in params]
        if not kinds:
            raise pytest.UsageError(f"{item.nodeid}: an extension test needs one of {KIND_FIXTURES}")
        kind = "cloudflare" if kinds[0] == "cloudflare-deployed" else kinds[0]
        if not EXTENSIONS[name][kind]:
            reason = f"the {kind} relay does not implement the extension {name!r} (docs/spec/extensions.toml)"
            item.add_marker(pytest.mark.may_skip(reason=reason))  # a legitimate skip (tests/conftest.py)
            item.add_marker(pytest.mark.skip(reason=reason))


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


@contextlib.contextmanager
def scripted_relay(kind: str, path: Path) -> Iterator[Relay]:
    """A relay of ``kind`` whose default route ``app`` and route ``up`` lead through one bridge to
    the scripted upstream (tests/scripted_upstream.py); once stopped, no secret in their logs."""
    proc, upstream = scripted_upstream.start()
    relay = start_relay(kind, path, default_route="app")
    bridge = Bridge(relay, {"app": upstream, "up": upstream})
    try:
        yield relay
    finally:
        bridge.stop()
        relay.proc.stop()
        proc.stop()
    _assert_no_secret_logged(relay.proc, bridge.proc)


@pytest.fixture(params=RELAYS)
def bare_relay(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Relay]:
    """A relay of each kind with no bridge yet, a short grace and a 1-second heartbeat."""
    relay = start_relay(request.param, tmp_path / "relay", grace=SHORT_GRACE, heartbeat=1)
    yield relay
    relay.proc.stop()
    _assert_no_secret_logged(relay.proc)


@pytest.fixture(params=RELAYS)
def relay_kind(request: pytest.FixtureRequest) -> str:
    """Which relay a test that starts its own (``make_relay``) runs against."""
    kind: str = request.param
    return kind


@pytest.fixture
def make_relay(relay_kind: str, tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Start relays of the test's kind with settings of its own (``start_relay``'s keywords)."""
    made: list[Relay] = []

    def make(**settings: Any) -> Relay:
        relay = start_relay(relay_kind, tmp_path / f"relay-{len(made)}", **settings)
        made.append(relay)
        return relay

    yield make
    for relay in made:
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
