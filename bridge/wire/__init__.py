"""The wire protocol as a sans-I/O core (docs/protocol.md): bytes in, events out, no sockets, no clock.

=================  =============================================================================
``constants``      the protocol's numbers and codes, generated from the spec (imports nothing)
``frames``         the frame header, splitting a message into frames, header blocks (JSON)
``records``        WebSocket messages carried as records in a stream's DATA
``events``         what :meth:`Connection.receive` returns, each saying what the caller does next
``connection``     :class:`Connection`: one end's state (handshake, streams, flow control)
``handshake``      the HELLO, WELCOME and GOAWAY bodies, built and checked (used by ``connection``)
=================  =============================================================================

``from bridge import wire`` gives every public name of these modules in one namespace
(``wire.Connection``, ``wire.FrameType``, ``wire.encode_frame``, ...). The constants are imported at
once; the other modules when a name of theirs is first used, so that ``bridge.wire.constants`` stays
importable with no other bridge module (the spec's generator and its test rely on that).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .constants import *  # noqa: F403 (every name of the generated module)

if TYPE_CHECKING:  # what __getattr__ below imports on first use
    from .connection import Connection as Connection
    from .connection import Role as Role
    from .events import *  # noqa: F403
    from .frames import *  # noqa: F403
    from .records import *  # noqa: F403

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
        "encode_block",
        "encode_frame",
        "iter_frames",
        "valid_method",
        "valid_target",
    ),
    "records": ("WsRecordReader", "decode_ws_close", "encode_ws_close", "encode_ws_record"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
