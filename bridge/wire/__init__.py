"""The wire protocol as a sans-I/O core (docs/protocol.md): bytes in, events out, no sockets, no clock.

=================  =============================================================================
``constants``      the protocol's numbers and codes, generated from the spec (imports nothing)
``frames``         the frame header, splitting a message into frames, header blocks (JSON)
``records``        WebSocket messages carried as records in a stream's DATA
``events``         what :meth:`Connection.receive` returns, each saying what the caller does next
``connection``     :class:`Connection`: one end's state (handshake, streams, flow control)
=================  =============================================================================

``from bridge import wire`` gives every public name of these modules in one namespace
(``wire.Connection``, ``wire.FrameType``, ``wire.encode_frame``, ...). The constants are imported at
once; the other modules when a name of theirs is first used, so that ``bridge.wire.constants`` stays
importable with no other bridge module (the spec's generator and its test rely on that).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .constants import (
    ABSOLUTE_MAX_PAYLOAD,
    DEFAULT_MAX_FRAME,
    DEFAULT_MAX_STREAMS,
    DEFAULT_WINDOW,
    HEADER_SIZE,
    MAX_HEADER_BLOCK,
    MAX_MESSAGE,
    MAX_STREAM_ID,
    MAX_WINDOW,
    MAX_WS_MESSAGE,
    PING,
    PONG,
    PROTOCOL_VERSION,
    STATUS_FOR_CODE,
    WS_BINARY,
    WS_CLOSE,
    WS_RECORD_HEADER,
    WS_TEXT,
    ErrorCode,
    Flags,
    FrameType,
)

if TYPE_CHECKING:
    from .connection import Connection, Role
    from .events import (
        DataReceived,
        Event,
        GoAwayReceived,
        HelloReceived,
        ResponseReceived,
        StatsReceived,
        StreamOpened,
        StreamReset,
        WelcomeReceived,
        WindowUpdated,
    )
    from .frames import (
        Frame,
        Headers,
        decode_block,
        encode_block,
        encode_frame,
        iter_frames,
        valid_method,
        valid_target,
    )
    from .records import WsRecordReader, decode_ws_close, encode_ws_close, encode_ws_record

_LAZY = {
    "connection": ("Connection", "Role"),
    "events": (
        "DataReceived",
        "Event",
        "GoAwayReceived",
        "HelloReceived",
        "ResponseReceived",
        "StatsReceived",
        "StreamOpened",
        "StreamReset",
        "WelcomeReceived",
        "WindowUpdated",
    ),
    "frames": (
        "Frame",
        "Headers",
        "decode_block",
        "encode_block",
        "encode_frame",
        "iter_frames",
        "valid_method",
        "valid_target",
    ),
    "records": ("WsRecordReader", "decode_ws_close", "encode_ws_close", "encode_ws_record"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "ABSOLUTE_MAX_PAYLOAD",
    "DEFAULT_MAX_FRAME",
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_WINDOW",
    "HEADER_SIZE",
    "MAX_HEADER_BLOCK",
    "MAX_MESSAGE",
    "MAX_STREAM_ID",
    "MAX_WINDOW",
    "MAX_WS_MESSAGE",
    "PING",
    "PONG",
    "PROTOCOL_VERSION",
    "STATUS_FOR_CODE",
    "WS_BINARY",
    "WS_CLOSE",
    "WS_RECORD_HEADER",
    "WS_TEXT",
    "Connection",
    "DataReceived",
    "ErrorCode",
    "Event",
    "Flags",
    "Frame",
    "FrameType",
    "GoAwayReceived",
    "Headers",
    "HelloReceived",
    "ResponseReceived",
    "Role",
    "StatsReceived",
    "StreamOpened",
    "StreamReset",
    "WelcomeReceived",
    "WindowUpdated",
    "WsRecordReader",
    "decode_block",
    "decode_ws_close",
    "encode_block",
    "encode_frame",
    "encode_ws_close",
    "encode_ws_record",
    "iter_frames",
    "valid_method",
    "valid_target",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
