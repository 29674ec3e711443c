"""The sans-I/O core: bytes in, events out, bytes out. No sockets."""

from __future__ import annotations

import json
import struct

import pytest

from bridge import wire as p
from bridge.errors import HeadersTooLarge, LocalProtocolError, ProtocolError


def pair(
    window: int = p.DEFAULT_WINDOW, max_frame: int = p.DEFAULT_MAX_FRAME
) -> tuple[p.Connection, p.Connection]:
    """A relay and a bridge core with the handshake done."""
    relay = p.Connection(p.Role.RELAY, window=window, max_frame=max_frame)
    bridge = p.Connection(p.Role.BRIDGE, window=window, max_frame=max_frame)
    bridge.send_hello("tok", "node-a", ["ollama", "webui"])
    (hello,) = deliver(bridge, relay)
    assert isinstance(hello, p.HelloReceived)
    relay.accept("sess-1", 5.0)
    (welcome,) = deliver(relay, bridge)
    assert isinstance(welcome, p.WelcomeReceived)
    return relay, bridge


def deliver(src: p.Connection, dst: p.Connection) -> list[p.Event]:
    events: list[p.Event] = []
    for message in src.data_to_send():
        events.extend(dst.receive(message))
    return events


def frames(conn: p.Connection) -> list[p.Frame]:
    return [f for m in conn.data_to_send() for f in p.iter_frames(m)]


# ------------------------------------------------------------------------------------------ framing


def test_frame_header_layout_is_exact() -> None:
    data = p.encode_frame(p.FrameType.DATA, p.Flags.END_STREAM, 7, b"hi")
    assert data == bytes.fromhex("000002050100000007") + b"hi"
    (frame,) = p.iter_frames(data)
    assert frame == p.Frame(5, 1, 7, b"hi")


def test_several_frames_in_one_message() -> None:
    message = (
        p.encode_frame(5, 0, 1, b"a") + p.encode_frame(5, 0, 3, b"") + p.encode_frame(7, 0, 1, b"\0\0\0\1")
    )
    assert [(f.type, f.stream_id, f.payload) for f in p.iter_frames(message)] == [
        (5, 1, b"a"),
        (5, 3, b""),
        (7, 1, b"\0\0\0\1"),
    ]


@pytest.mark.parametrize(
    "message, text",
    [
        (b"", "empty"),
        (b"\x00\x00\x01\x05", "truncated frame header"),
        (p.encode_frame(5, 0, 1, b"abc")[:-1], "runs past the end"),
        (bytes.fromhex("000000050080000001"), "reserved bit"),
    ],
)
def test_malformed_messages_are_protocol_errors(message: bytes, text: str) -> None:
    with pytest.raises(ProtocolError, match=text) as info:
        list(p.iter_frames(message))
    assert info.value.code == p.ErrorCode.PROTOCOL_ERROR


def test_encoder_refuses_what_the_header_cannot_carry() -> None:
    with pytest.raises(LocalProtocolError):
        p.encode_frame(5, 0, 1 << 31)
    with pytest.raises(LocalProtocolError):
        p.encode_frame(5, 0, 1, bytes(1 << 24))


# ------------------------------------------------------------------------------------------ handshake


def test_hello_carries_version_token_routes_and_limits() -> None:
    bridge = p.Connection(p.Role.BRIDGE, window=1000, max_frame=500)
    bridge.send_hello("s3cret", "kaggle-1", ["ollama"], gpus=2)
    (frame,) = frames(bridge)
    assert (frame.type, frame.flags, frame.stream_id) == (p.FrameType.HELLO, 0, 0)
    body = json.loads(frame.payload)
    assert body == {
        "version": p.PROTOCOL_VERSION,
        "token": "s3cret",
        "node": "kaggle-1",
        "routes": ["ollama"],
        "window": 1000,
        "max_frame": 500,
        "gpus": 2,
    }
    relay = p.Connection(p.Role.RELAY)
    (hello,) = relay.receive(frame.encode())
    assert isinstance(hello, p.HelloReceived)
    assert (hello.token, hello.node, hello.routes, hello.info) == (
        "s3cret",
        "kaggle-1",
        ["ollama"],
        {"gpus": 2},
    )
    assert (relay.peer_window, relay.peer_max_frame) == (1000, 500)


def test_nothing_but_handshake_frames_before_welcome() -> None:
    relay = p.Connection(p.Role.RELAY)
    with pytest.raises(ProtocolError, match="before the handshake"):
        relay.receive(p.encode_frame(p.FrameType.DATA, 0, 1, b"x"))


def test_second_hello_is_fatal() -> None:
    relay, _ = pair()
    hello = p.encode_frame(p.FrameType.HELLO, 0, 0, b'{"version":1}')
    with pytest.raises(ProtocolError, match="second HELLO"):
        relay.receive(hello)


def test_a_bridge_refuses_hello_and_open_only_goes_relay_to_bridge() -> None:
    relay, bridge = pair()
    with pytest.raises(ProtocolError):
        bridge.receive(p.encode_frame(p.FrameType.HELLO, 0, 0, b'{"version":1}'))
    with pytest.raises(ProtocolError):
        relay.receive(p.encode_frame(p.FrameType.OPEN, 0, 1, b'{"method":"GET","route":"x","target":"/"}'))


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1,2]",
        b'{"no_version":1}',
        b'{"version":1,"routes":"ollama"}',
        b'{"version":1,"window":0}',
    ],
)
def test_bad_hello_payloads_are_protocol_errors(payload: bytes) -> None:
    relay = p.Connection(p.Role.RELAY)
    with pytest.raises(ProtocolError):
        relay.receive(p.encode_frame(p.FrameType.HELLO, 0, 0, payload))


def test_reject_sends_goaway_with_code() -> None:
    relay = p.Connection(p.Role.RELAY)
    relay.reject(p.ErrorCode.UNAUTHORIZED, "wrong node token")
    (frame,) = frames(relay)
    assert frame.type == p.FrameType.GOAWAY
    assert json.loads(frame.payload) == {"code": 11, "reason": "wrong node token", "last_stream_id": 0}
    bridge = p.Connection(p.Role.BRIDGE)
    (event,) = bridge.receive(frame.encode())
    assert event == p.GoAwayReceived(11, "wrong node token", 0)


# ------------------------------------------------------------------------------------------ streams


def test_request_response_round_trip() -> None:
    relay, bridge = pair()
    sid = relay.next_stream_id()
    relay.open_stream(
        sid, "POST", "ollama", "/api/chat?x=1", [("Content-Type", "application/json")], client="1.2.3.4"
    )
    relay.send_data(sid, b'{"model":"m"}', end_stream=True)
    opened, body = deliver(relay, bridge)
    assert opened == p.StreamOpened(
        sid,
        "POST",
        "ollama",
        "/api/chat?x=1",
        [("Content-Type", "application/json")],
        False,
        {"client": "1.2.3.4"},
    )
    assert body == p.DataReceived(sid, b'{"model":"m"}', True)
    bridge.send_response(sid, 200, [("Content-Type", "application/x-ndjson")])
    bridge.send_data(sid, b'{"a":1}\n')
    bridge.send_data(sid, b"", end_stream=True)
    head, d1, d2 = deliver(bridge, relay)
    assert head == p.ResponseReceived(sid, 200, [("Content-Type", "application/x-ndjson")], False)
    assert d1 == p.DataReceived(sid, b'{"a":1}\n', False)
    assert d2 == p.DataReceived(sid, b"", True)
    assert sid not in relay.streams and sid not in bridge.streams


def test_stream_ids_must_increase() -> None:
    relay, bridge = pair()
    relay.open_stream(5, "GET", "r", "/", [], end_stream=True)
    with pytest.raises(LocalProtocolError) as info:
        relay.open_stream(5, "GET", "r", "/", [])
    assert not isinstance(info.value, HeadersTooLarge)  # a caller's bug, never a 431
    deliver(relay, bridge)
    with pytest.raises(ProtocolError, match="does not increase"):
        bridge.receive(p.encode_frame(p.FrameType.OPEN, 1, 3, b'{"method":"GET","route":"r","target":"/"}'))


def test_open_with_invalid_header_is_fatal() -> None:
    _, bridge = pair()
    bad = json.dumps({"method": "GET", "route": "r", "target": "/", "headers": [["X-A", "v\r\nInjected: 1"]]})
    with pytest.raises(ProtocolError, match="invalid header"):
        bridge.receive(p.encode_frame(p.FrameType.OPEN, 1, 1, bad.encode()))


@pytest.mark.parametrize("method, target", [("GET", "http://evil.example/"), ("GE T", "/"), ("GET", "/a b")])
def test_open_with_a_bad_method_or_target_resets_only_that_stream(method: str, target: str) -> None:
    _, bridge = pair()
    bad = json.dumps({"method": method, "route": "r", "target": target})
    (event,) = bridge.receive(p.encode_frame(p.FrameType.OPEN, 1, 1, bad.encode()))
    assert event == p.StreamReset(1, p.ErrorCode.PROTOCOL_ERROR, "OPEN: invalid method or target", False)
    (frame,) = frames(bridge)
    assert (frame.type, frame.stream_id) == (p.FrameType.RESET, 1)
    ok = json.dumps({"method": "M-SEARCH", "route": "r", "target": "/x"})
    (opened,) = bridge.receive(p.encode_frame(p.FrameType.OPEN, 1, 3, ok.encode()))
    assert isinstance(opened, p.StreamOpened) and opened.method == "M-SEARCH"


def test_unknown_frame_types_are_ignored() -> None:
    relay, _ = pair()
    assert relay.receive(p.encode_frame(0x42, 0, 0, b"future")) == []


def test_data_on_a_never_opened_stream_is_fatal_but_on_a_finished_one_is_dropped() -> None:
    relay, bridge = pair()
    relay.open_stream(1, "GET", "r", "/", [], end_stream=True)
    deliver(relay, bridge)
    bridge.send_response(1, 200, [], end_stream=True)
    deliver(bridge, relay)
    assert relay.receive(p.encode_frame(p.FrameType.DATA, 0, 1, b"late")) == []
    with pytest.raises(ProtocolError, match="never opened"):
        relay.receive(p.encode_frame(p.FrameType.DATA, 0, 9, b"x"))


def test_reset_ends_the_stream_on_both_sides_with_code_and_reason() -> None:
    relay, bridge = pair()
    relay.open_stream(1, "GET", "r", "/", [], end_stream=True)
    deliver(relay, bridge)
    bridge.send_reset(1, p.ErrorCode.UPSTREAM_UNREACHABLE, "ollama unreachable")
    (frame,) = frames(bridge)
    assert frame.payload == struct.pack(">I", 8) + b"ollama unreachable"
    (event,) = relay.receive(frame.encode())
    assert event == p.StreamReset(1, 8, "ollama unreachable", True)
    assert 1 not in relay.streams and 1 not in bridge.streams
    assert p.STATUS_FOR_CODE[p.ErrorCode.UPSTREAM_UNREACHABLE] == 502


def test_short_reset_is_fatal() -> None:
    relay, _ = pair()
    with pytest.raises(ProtocolError):
        relay.receive(p.encode_frame(p.FrameType.RESET, 0, 1, b"\0\0"))


def test_data_before_response_resets_the_stream_not_the_connection() -> None:
    relay, _ = pair()
    relay.open_stream(1, "GET", "r", "/", [], end_stream=True)
    relay.data_to_send()
    (event,) = relay.receive(p.encode_frame(p.FrameType.DATA, 0, 1, b"x"))
    assert event == p.StreamReset(1, p.ErrorCode.PROTOCOL_ERROR, "DATA before RESPONSE", remote=False)
    (frame,) = frames(relay)
    assert (frame.type, frame.stream_id) == (p.FrameType.RESET, 1)


def test_goaway_refuses_new_streams() -> None:
    relay, bridge = pair()
    bridge.send_goaway(p.ErrorCode.NO_ERROR, "draining")
    (event,) = deliver(bridge, relay)
    assert isinstance(event, p.GoAwayReceived) and event.code == 0
    assert not relay.can_open
    with pytest.raises(LocalProtocolError):
        relay.open_stream(1, "GET", "r", "/", [])
    # An OPEN that crossed the GOAWAY on the wire is refused with REFUSED_STREAM (safe to retry).
    assert (
        bridge.receive(p.encode_frame(p.FrameType.OPEN, 1, 1, b'{"method":"GET","route":"r","target":"/"}'))
        == []
    )
    (frame,) = frames(bridge)
    assert frame.type == p.FrameType.RESET
    assert struct.unpack(">I", frame.payload[:4])[0] == p.ErrorCode.REFUSED_STREAM


def test_stream_limit_refuses_with_too_many_streams() -> None:
    relay = p.Connection(p.Role.RELAY)
    bridge = p.Connection(p.Role.BRIDGE, max_streams=2)
    bridge.send_hello("t", "n", [])
    deliver(bridge, relay)
    relay.accept("s", 5)
    deliver(relay, bridge)
    for sid in (1, 2, 3):
        relay.open_stream(sid, "GET", "r", "/", [], end_stream=True)
    events = deliver(relay, bridge)
    assert [type(e).__name__ for e in events] == ["StreamOpened", "StreamOpened"]
    (frame,) = frames(bridge)
    assert (frame.type, frame.stream_id) == (p.FrameType.RESET, 3)
    assert struct.unpack(">I", frame.payload[:4])[0] == p.ErrorCode.TOO_MANY_STREAMS


# ------------------------------------------------------------------------------------------ flow control


def test_sender_may_not_exceed_the_window() -> None:
    relay, _ = pair(window=100)
    relay.open_stream(1, "POST", "r", "/", [])
    assert relay.send_window(1) == 100
    relay.send_data(1, b"x" * 100)
    assert relay.send_window(1) == 0
    with pytest.raises(LocalProtocolError, match="exceed the send window"):
        relay.send_data(1, b"y")


def test_credit_is_returned_in_batches_of_half_the_window() -> None:
    relay, bridge = pair(window=100)
    relay.open_stream(1, "POST", "r", "/", [])
    relay.send_data(1, b"x" * 100)
    deliver(relay, bridge)
    bridge.acknowledge(1, 30)
    assert bridge.data_to_send() == []  # 30 < 50: no WINDOW yet
    bridge.acknowledge(1, 30)
    (frame,) = frames(bridge)
    assert frame == p.Frame(p.FrameType.WINDOW, 0, 1, struct.pack(">I", 60))
    (event,) = relay.receive(frame.encode())
    assert event == p.WindowUpdated(1, 60)
    assert relay.send_window(1) == 60


def test_data_beyond_the_window_resets_with_flow_control_error() -> None:
    relay, bridge = pair(window=10)
    relay.open_stream(1, "POST", "r", "/", [])
    deliver(relay, bridge)
    (event,) = bridge.receive(p.encode_frame(p.FrameType.DATA, 0, 1, b"x" * 11))
    assert event == p.StreamReset(
        1, p.ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the flow-control window", False
    )


def test_data_larger_than_max_frame_is_split_and_oversized_frames_refused() -> None:
    relay, bridge = pair(max_frame=4)
    relay.open_stream(1, "POST", "r", "/", [])
    relay.send_data(1, b"abcdefghij", end_stream=True)
    sent = [f for f in frames(relay) if f.type == p.FrameType.DATA]
    assert [f.payload for f in sent] == [b"abcd", b"efgh", b"ij"]
    assert [f.flags for f in sent] == [0, 0, p.Flags.END_STREAM]
    relay.open_stream(3, "POST", "r", "/", [])
    deliver(relay, bridge)
    (event,) = bridge.receive(p.encode_frame(p.FrameType.DATA, 0, 3, b"12345"))
    assert isinstance(event, p.StreamReset) and event.code == p.ErrorCode.FRAME_TOO_LARGE


def test_window_overflow_and_zero_increment_reset_the_stream() -> None:
    relay, _ = pair()
    relay.open_stream(1, "POST", "r", "/", [])
    relay.data_to_send()
    (event,) = relay.receive(p.encode_frame(p.FrameType.WINDOW, 0, 1, struct.pack(">I", 0)))
    assert isinstance(event, p.StreamReset) and event.code == p.ErrorCode.FLOW_CONTROL_ERROR
    relay.open_stream(2, "POST", "r", "/", [])
    relay.data_to_send()
    (event,) = relay.receive(p.encode_frame(p.FrameType.WINDOW, 0, 2, struct.pack(">I", p.MAX_WINDOW)))
    assert isinstance(event, p.StreamReset) and event.code == p.ErrorCode.FLOW_CONTROL_ERROR


def test_outgoing_frames_are_coalesced_into_bounded_messages() -> None:
    relay, bridge = pair()
    for sid in range(1, 41):
        relay.open_stream(sid, "POST", "r", "/", [])
        relay.send_data(sid, bytes(60_000))
    messages = relay.data_to_send()
    assert 1 < len(messages) < 40
    assert all(len(m) <= p.MAX_MESSAGE for m in messages)
    events = [e for m in messages for e in bridge.receive(m)]
    assert sum(len(e.data) for e in events if isinstance(e, p.DataReceived)) == 40 * 60_000


def test_header_block_limit() -> None:
    relay, bridge = pair()
    with pytest.raises(HeadersTooLarge):
        relay.open_stream(1, "GET", "r", "/", [("X-Big", "a" * p.MAX_HEADER_BLOCK)])
    huge = json.dumps({"method": "GET", "route": "r", "target": "/", "pad": "a" * p.MAX_HEADER_BLOCK})
    with pytest.raises(ProtocolError) as info:
        bridge.receive(p.encode_frame(p.FrameType.OPEN, 0, 1, huge.encode()))
    assert info.value.code == p.ErrorCode.HEADERS_TOO_LARGE


# ------------------------------------------------------------------------------------------ STATS
def _pair() -> tuple[p.Connection, p.Connection]:
    relay, bridge = p.Connection(p.Role.RELAY), p.Connection(p.Role.BRIDGE)
    bridge.send_hello("t", "n", ["r"])
    (hello,) = relay.receive(b"".join(bridge.data_to_send()))
    assert isinstance(hello, p.HelloReceived)
    relay.accept("s", 5.0)
    bridge.receive(b"".join(relay.data_to_send()))
    return relay, bridge


def test_stats_bytes_and_event() -> None:
    relay, bridge = _pair()
    bridge.send_stats({"kind": "sample", "cpu_percent": 5})
    (message,) = bridge.data_to_send()
    # u24 length, u8 type 0x09, u8 flags, u32 stream id 0, then the JSON
    assert message[:9] == len(message[9:]).to_bytes(3, "big") + bytes([0x09, 0x00]) + (0).to_bytes(4, "big")
    assert relay.receive(message) == [p.StatsReceived({"kind": "sample", "cpu_percent": 5})]


def test_stats_rules() -> None:
    relay, bridge = _pair()
    with pytest.raises(LocalProtocolError):
        relay.send_stats({"kind": "x"})  # only bridges send STATS
    assert bridge.receive(p.encode_frame(p.FrameType.STATS, 0, 0, b"{}")) == []  # ignored by a bridge
    with pytest.raises(ProtocolError):
        relay.receive(p.encode_frame(p.FrameType.STATS, 0, 1, b"{}"))
    with pytest.raises(HeadersTooLarge):
        bridge.send_stats({"kind": "x", "blob": "a" * 70_000})
    fresh = p.Connection(p.Role.RELAY)
    with pytest.raises(ProtocolError):
        fresh.receive(p.encode_frame(p.FrameType.STATS, 0, 0, b"{}"))  # before HELLO


def test_reset_reason_is_cut_on_a_character_boundary() -> None:
    relay, bridge = _pair()
    relay.open_stream(1, "GET", "r", "/", [])
    bridge.receive(b"".join(relay.data_to_send()))
    bridge.send_reset(1, p.ErrorCode.CANCEL, "é" * 1000)  # 2,000 bytes of UTF-8
    (event,) = relay.receive(b"".join(bridge.data_to_send()))
    assert isinstance(event, p.StreamReset)
    assert event.reason == "é" * 512


def test_peer_max_frame_is_capped_to_one_message() -> None:
    relay, bridge = p.Connection(p.Role.RELAY), p.Connection(p.Role.BRIDGE, max_frame=8 * 1024 * 1024)
    bridge.send_hello("t", "n", ["r"])
    relay.receive(b"".join(bridge.data_to_send()))
    assert relay.peer_max_frame == p.MAX_MESSAGE - p.HEADER_SIZE
