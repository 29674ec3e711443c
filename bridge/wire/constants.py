"""The wire constants (docs/spec/wire.md), generated from docs/spec/wire.toml.

Do not edit: change the spec and run ``python3 scripts/gen_wire.py``, which writes the TypeScript
relay's constants from the same file. Importable with no other bridge module.
"""

from __future__ import annotations

import enum

#: Protocol version carried in HELLO and WELCOME. Bump on any incompatible change.
PROTOCOL_VERSION = 1
#: Bytes of every frame header: u24 length, u8 type, u8 flags, reserved bit + u31 stream id.
HEADER_SIZE = 9
#: Largest payload the 24-bit length field can carry (2**24 - 1).
ABSOLUTE_MAX_PAYLOAD = 16_777_215
#: Default largest DATA payload a peer accepts (each side announces its own in HELLO/WELCOME).
DEFAULT_MAX_FRAME = 65536
#: Largest OPEN/RESPONSE/HELLO/WELCOME/GOAWAY/STATS payload (the JSON "header block").
MAX_HEADER_BLOCK = 65536
#: Default per-stream flow-control window, in bytes of DATA payload.
DEFAULT_WINDOW = 262_144
#: Largest window a peer may announce or grow a stream to (2**31 - 1, as in HTTP/2).
MAX_WINDOW = 2_147_483_647
#: Default cap on concurrently open streams per connection.
DEFAULT_MAX_STREAMS = 4096
#: Largest stream id (2**31 - 1); a connection that used it opens no more streams.
MAX_STREAM_ID = 2_147_483_647
#: Largest binary WebSocket message a sender should build when coalescing frames.
MAX_MESSAGE = 1_048_576
#: Largest reason a sender puts in RESET (UTF-8 bytes) or GOAWAY (characters); longer is cut.
MAX_REASON = 1024
#: Longest HTTP method token OPEN may carry.
MAX_METHOD = 32
#: Characters of HELLO's node name a relay keeps.
MAX_NODE_NAME = 128
#: Seconds a relay waits for HELLO on a new bridge connection before closing it (1008).
HELLO_TIMEOUT = 10.0
#: Shortest heartbeat interval WELCOME may announce, in seconds.
MIN_HEARTBEAT = 0.05
#: Longest heartbeat interval WELCOME may announce, in seconds.
MAX_HEARTBEAT = 3600.0
#: Heartbeat intervals without any message after which either side declares the link dead.
HEARTBEAT_MISSES = 3

# Heartbeat: text WebSocket messages (Cloudflare's auto-response matches text only).
#: Heartbeat text message. Either side may send PING at any time; the receiver answers PONG.
PING = "ping"
#: The answer to PING.
PONG = "pong"
#: HTTP status for a stream reset before its response with a code STATUS_FOR_CODE lacks.
DEFAULT_RESET_STATUS = 502

# A tunnelled client WebSocket carries its messages as records in DATA: u8 opcode, u32 length, payload.
#: Record opcode: a text message (UTF-8).
WS_TEXT = 0x1
#: Record opcode: a binary message.
WS_BINARY = 0x2
#: Record opcode: the closing handshake, u16 close code + UTF-8 reason; END_STREAM follows.
WS_CLOSE = 0x8
#: Bytes of a record header: u8 opcode, u32 payload length.
WS_RECORD_HEADER = 5
#: Largest message a tunnelled WebSocket carries (either way).
MAX_WS_MESSAGE = 16_777_216
#: Largest close reason in a WS_CLOSE record, in UTF-8 bytes (a WebSocket close frame's limit).
MAX_WS_CLOSE_REASON = 123


class FrameType(enum.IntEnum):
    """The type byte of a frame; unknown types are ignored after the handshake."""

    HELLO = 0x1  # bridge -> relay, stream 0: JSON; first frame: version, node token, routes, limits
    WELCOME = 0x2  # relay -> bridge, stream 0: JSON; session accepted: limits, heartbeat interval
    # relay -> bridge, stream >= 1: JSON; request head (method, route, target, headers); opens the stream
    OPEN = 0x3
    RESPONSE = 0x4  # bridge -> relay, stream >= 1: JSON; response head (status, headers)
    DATA = 0x5  # either way, stream >= 1: bytes; body bytes; END_STREAM flag marks the last
    RESET = 0x6  # either way, stream >= 1: u32 code + UTF-8 reason; abort the stream in both directions
    WINDOW = 0x7  # either way, stream >= 1: u32 increment; flow-control credit for one stream
    GOAWAY = 0x8  # either way, stream 0: JSON; no new streams (drain or fatal error), then close
    # bridge -> relay, stream 0: JSON; measurements (requests, GPU, load) to publish; optional, ignorable
    STATS = 0x9


class Flags(enum.IntFlag):
    """The flags byte of a frame; undefined bits are sent as 0 and ignored on receipt."""

    NONE = 0x0  # no flag
    END_STREAM = 0x1  # on OPEN, RESPONSE, DATA: the sender's side of the stream is finished


class ErrorCode(enum.IntEnum):
    """The code RESET and GOAWAY carry."""

    NO_ERROR = 0  # graceful: a drain, or a response complete before the request body
    PROTOCOL_ERROR = 1  # a malformed or unexpected frame
    INTERNAL_ERROR = 2  # a bug or an unexpected failure in the sender
    FLOW_CONTROL_ERROR = 3  # DATA beyond the credit granted, or a window overflow
    FRAME_TOO_LARGE = 4  # a frame above the announced or absolute limits
    REFUSED_STREAM = 5  # the stream was not processed at all: safe to retry elsewhere
    CANCEL = 6  # the stream is no longer wanted (the client went away)
    NO_ROUTE = 7  # the bridge offers no route of that name
    UPSTREAM_UNREACHABLE = 8  # the bridge could not connect to the route's upstream
    UPSTREAM_TIMEOUT = 9  # the upstream did not answer in time
    UPSTREAM_ERROR = 10  # the upstream failed (mid-response or with an invalid answer)
    UNAUTHORIZED = 11  # HELLO carried a missing or wrong node token
    UNSUPPORTED_VERSION = 12  # no protocol version in common
    GOING_AWAY = 13  # the sender is shutting down
    TOO_MANY_STREAMS = 14  # the stream limit was reached
    HEADERS_TOO_LARGE = 15  # the request or response head exceeds the limits
    BODY_TOO_LARGE = 16  # the body exceeds a configured limit


class CloseCode(enum.IntEnum):
    """WebSocket close codes on a bridge's connection (the GOAWAY before them is what counts)."""

    NORMAL = 1000  # normal end (a bridge disconnected, or closed after draining or a protocol error)
    PROTOCOL_ERROR = 1002  # protocol error or unsupported version (after GOAWAY with its code)
    POLICY_VIOLATION = 1008  # no HELLO within HELLO_TIMEOUT, or the socket ended before HELLO
    INTERNAL_ERROR = 1011  # heartbeat timeout: nothing received for HEARTBEAT_MISSES intervals
    UNAUTHORIZED = 4401  # wrong node token (after GOAWAY UNAUTHORIZED)


#: Frame types that belong to a stream (id >= 1); the others travel on stream 0.
STREAM_FRAMES = frozenset(
    {FrameType.OPEN, FrameType.RESPONSE, FrameType.DATA, FrameType.RESET, FrameType.WINDOW}
)

#: HTTP status a relay answers when a stream is reset before its response head started
#: (any other code: DEFAULT_RESET_STATUS).
STATUS_FOR_CODE: dict[int, int] = {
    ErrorCode.REFUSED_STREAM: 503,
    ErrorCode.NO_ROUTE: 404,
    ErrorCode.UPSTREAM_UNREACHABLE: 502,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.GOING_AWAY: 503,
    ErrorCode.TOO_MANY_STREAMS: 503,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.BODY_TOO_LARGE: 413,
}
