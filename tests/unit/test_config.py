"""What users type, parsed once (bridge/config.py): routes with replicas, route ports, listen
addresses, the relay's one URL, and the checks a bridge's config passes before anything starts."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from bridge.config import BridgeConfig, Route, parse_listen, parse_route_ports, parse_routes, relay_url
from bridge.errors import ConfigError


def test_routes_and_their_replicas() -> None:
    routes = parse_routes(
        ["ollama=http://127.0.0.1:1,http://127.0.0.1:2/", "http://127.0.0.1:3 webui=http://h:8"]
    )
    assert routes == (
        Route("ollama", "http://127.0.0.1:1"),
        Route("ollama", "http://127.0.0.1:2"),
        Route("ollama", "http://127.0.0.1:3"),
        Route("webui", "http://h:8"),
    )
    assert parse_routes(["Engine=https://x/base"]) == (Route("engine", "https://x/base"),)


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["http://x:1"], "expected NAME=URL"),
        (["a=http://x:1,http://x:1"], "given twice"),
        (["a b=http://x"], "expected NAME=URL"),
        (["-a=http://x"], "made of a-z"),
        (["a=ftp://x"], r"is not an http\(s\)"),
        (["a=http://x/?q=1"], r"is not an http\(s\)"),
    ],
)
def test_bad_routes_say_what_is_wrong(items: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_routes(items)


def test_route_ports_and_listen_addresses() -> None:
    assert parse_route_ports(["ollama=9000,webui=9001", "x=1"]) == {9000: "ollama", 9001: "webui", 1: "x"}
    for bad in ("ollama", "ollama=0", "ollama=x", "Bad=1"):
        with pytest.raises(ConfigError):
            parse_route_ports([bad])
    assert parse_listen("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_listen("[::1]:8080") == ("::1", 8080)
    for bad in ("8080", ":8080", "host:x", "host:70000"):
        with pytest.raises(ConfigError):
            parse_listen(bad)


def test_the_relay_has_one_url_for_bridges_and_clients() -> None:
    assert relay_url("https://relay.example/", "ws") == "wss://relay.example"
    assert relay_url("ws://127.0.0.1:8000", "http") == "http://127.0.0.1:8000"
    assert relay_url("WSS://relay.example/base", "http") == "https://relay.example/base"
    with pytest.raises(ConfigError, match="expected ws://"):
        relay_url("relay.example", "ws")
    assert BridgeConfig(relay="https://relay.example").connect_url == "wss://relay.example/_relay/connect"


def test_a_bridge_config_is_checked_when_made(tmp_path: Path) -> None:
    routes = parse_routes(["ollama=http://127.0.0.1:1", "webui=http://127.0.0.1:2"])
    config = BridgeConfig(routes=routes, metrics_dir=tmp_path, listen="127.0.0.1:0")
    assert config.route_names == ["ollama", "webui"] and config.served_at_root == "ollama"
    assert BridgeConfig(routes=routes, default_route="webui").served_at_root == "webui"
    with pytest.raises(ConfigError, match="not one of the routes"):
        BridgeConfig(routes=routes, default_route="nope")
    with pytest.raises(ConfigError, match="without --listen-key"):
        BridgeConfig(routes=routes, listen="0.0.0.0:8080")
    assert BridgeConfig(routes=routes, listen="0.0.0.0:8080", listen_key="k").listen_key == "k"
    with pytest.raises(ConfigError, match="expected ws://"):
        BridgeConfig(relay="relay.example:8000")


def test_bridge_up_says_when_its_in_process_bridge_crashes(caplog: pytest.LogCaptureFixture) -> None:
    """`bridge up` runs the bridge as a task beside the relay: a crash must reach the log."""
    from bridge.cli import _report_bridge_end

    async def crash() -> None:
        raise RuntimeError("boom")

    async def cancelled() -> None:
        await asyncio.sleep(3600)

    async def main() -> None:
        failed = asyncio.get_running_loop().create_task(crash())
        await asyncio.wait([failed])
        _report_bridge_end(failed)
        stopped = asyncio.get_running_loop().create_task(cancelled())
        stopped.cancel()
        await asyncio.wait([stopped])
        _report_bridge_end(stopped)

    with caplog.at_level(logging.ERROR, logger="bridge.up"):
        asyncio.run(main())
    assert [r.getMessage() for r in caplog.records] == [
        "the in-process bridge stopped: boom; the relay keeps serving without it"
    ]
