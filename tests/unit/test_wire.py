"""The sans-I/O core's own errors and its one namespace (tests/test_protocol.py has the protocol;
docs/spec's vectors the bytes)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bridge import wire
from bridge.errors import ConfigError, HeadersTooLarge, LocalProtocolError, ProtocolError


def established() -> tuple[wire.Connection, wire.Connection]:
    relay, bridge = wire.Connection(wire.Role.RELAY), wire.Connection(wire.Role.BRIDGE)
    bridge.send_hello("t", "n", ["r"])
    relay.receive(b"".join(bridge.data_to_send()))
    relay.accept("s", 5.0)
    bridge.receive(b"".join(relay.data_to_send()))
    return relay, bridge


def test_what_the_caller_asks_wrongly_is_a_local_error_and_only_a_big_head_is_too_large() -> None:
    relay, bridge = established()
    with pytest.raises(HeadersTooLarge):
        relay.open_stream(1, "GET", "r", "/", [("x", "a" * wire.MAX_HEADER_BLOCK)])
    relay.open_stream(2, "GET", "r", "/", [])
    for call in (
        lambda: relay.open_stream(2, "GET", "r", "/", []),  # stream ids must increase
        lambda: relay.send_stats({}),  # a relay sends no STATS
        lambda: bridge.open_stream(9, "GET", "r", "/", []),  # a bridge opens no stream
        lambda: relay.send_data(99, b"x"),  # no such stream
        lambda: wire.encode_frame(0x100, 0, 1),
        lambda: wire.encode_ws_record(7, b""),
    ):
        with pytest.raises(LocalProtocolError) as info:
            call()
        assert not isinstance(info.value, HeadersTooLarge | ProtocolError)
    with pytest.raises(ConfigError):
        wire.Connection(wire.Role.RELAY, window=0)


def test_a_connection_says_whether_it_can_open_a_stream() -> None:
    assert not wire.Connection(wire.Role.RELAY).can_open  # no session yet
    relay, bridge = established()
    assert relay.can_open
    relay.last_stream_id = wire.MAX_STREAM_ID
    assert not relay.can_open
    relay, bridge = established()
    bridge.send_goaway(wire.ErrorCode.NO_ERROR, "draining")
    relay.receive(b"".join(bridge.data_to_send()))
    assert not relay.can_open


def test_the_constants_import_alone_and_the_namespace_has_every_public_name() -> None:
    code = "import sys, bridge.wire.constants;print(sorted(m for m in sys.modules if m.startswith('bridge')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['bridge', 'bridge.wire', 'bridge.wire.constants']"
    for name in (
        "Connection",
        "StreamOpened",
        "encode_frame",
        "WsRecordReader",
        "FrameType",
        "STATUS_FOR_CODE",
    ):
        assert getattr(wire, name) is not None
    with pytest.raises(AttributeError):
        _ = wire.nothing_of_that_name
