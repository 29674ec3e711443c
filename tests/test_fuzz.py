"""Property tests: whatever bytes a peer sends, the core either returns events or raises
ProtocolError, never anything else, and a well-formed exchange always survives the round trip."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from bridge import wire as p
from bridge.errors import ProtocolError

from .test_protocol import pair

frame_types = st.one_of(st.sampled_from(list(p.FrameType)), st.integers(0, 255))
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda c, r: struct.pack(">I", c) + r, st.integers(0, 2**32 - 1), st.binary(max_size=8)),
    st.sampled_from(
        [
            b'{"method":"GET","route":"r","target":"/"}',
            b'{"status":200,"headers":[]}',
            b'{"status":200,"headers":[["a"]]}',
            b'{"version":1,"session":"s","heartbeat":1}',
            b'{"code":0}',
            b"{}",
            b"null",
            b"\xff\xfe",
        ]
    ),
)
frames = st.builds(p.encode_frame, frame_types, st.integers(0, 255), st.integers(0, 6), payloads)
messages = st.one_of(
    st.lists(frames, min_size=1, max_size=6).map(b"".join),
    st.binary(max_size=80),
)


def _feed(conn: p.Connection, message: bytes) -> None:
    try:
        events = conn.receive(message)
    except ProtocolError as exc:
        assert isinstance(exc.code, int)
        return
    assert all(isinstance(e, p.Event) for e in events)
    for m in conn.data_to_send():  # whatever the core queues in answer must itself be valid
        list(p.iter_frames(m))


@settings(max_examples=400, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_relay_survives_any_bytes_from_a_bridge(batch: list[bytes]) -> None:
    relay, _ = pair()
    relay.open_stream(1, "POST", "r", "/", [])
    relay.open_stream(2, "GET", "r", "/", [], end_stream=True)
    relay.data_to_send()
    for message in batch:
        _feed(relay, message)


@settings(max_examples=400, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5))
def test_bridge_survives_any_bytes_from_a_relay(batch: list[bytes]) -> None:
    _, bridge = pair()
    for message in batch:
        _feed(bridge, message)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=3))
def test_fresh_relay_survives_any_first_messages(batch: list[bytes]) -> None:
    relay = p.Connection(p.Role.RELAY)
    for message in batch:
        _feed(relay, message)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.binary(min_size=0, max_size=3000), min_size=1, max_size=10),
    st.integers(1, 2048),
    st.integers(16, 8192),
)
def test_any_body_arrives_intact_in_order(chunks: list[bytes], max_frame: int, window: int) -> None:
    relay, bridge = pair(window=window, max_frame=max_frame)
    relay.open_stream(1, "POST", "r", "/", [])
    got = bytearray()
    pending = list(chunks)
    ended = False
    deliver_events = []
    while not ended:
        credit = relay.send_window(1)
        if pending and credit:
            chunk = pending[0][:credit]
            pending[0] = pending[0][len(chunk) :]
            if not pending[0]:
                pending.pop(0)
            relay.send_data(1, chunk, end_stream=not pending)
        elif not pending:
            relay.send_data(1, b"", end_stream=True)
        for m in relay.data_to_send():
            deliver_events = bridge.receive(m)
            for e in deliver_events:
                if isinstance(e, p.StreamOpened):
                    continue
                assert isinstance(e, p.DataReceived)
                got.extend(e.data)
                bridge.acknowledge(1, len(e.data))
                ended = ended or e.end_stream
        for m in bridge.data_to_send():
            relay.receive(m)
    assert bytes(got) == b"".join(chunks)
