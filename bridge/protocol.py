"""The tunnel's wire protocol, sans I/O: bytes in, events out, no sockets.

The specification is ``docs/protocol.md``; this module is its reference implementation and the
Cloudflare relay implements the same document. Nothing here touches the network or the clock: the
asyncio layers (:mod:`bridge.relay`, :mod:`bridge.node`) feed every binary WebSocket message to
:meth:`Connection.receive`, act on the events it returns, call the ``send_*`` methods, and write what
:meth:`Connection.data_to_send` hands back as binary WebSocket messages. Heartbeats (the text messages
``ping``/``pong``), timeouts and reconnection belong to those layers, not here.

Frame layout (9-byte header, big-endian, the same shape as HTTP/2's)::

    +-----------------------------------------------+
    |                 Length (24)                   |  payload length in bytes
    +---------------+---------------+---------------+
    |   Type (8)    |   Flags (8)   |
    +-+-------------+---------------+-------------------------------+
    |R|                 Stream Identifier (31)                      |
    +=+=============================================================+
    |                   Payload (Length bytes)                      |
    +---------------------------------------------------------------+
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ProtocolError

#: Protocol version carried in HELLO and WELCOME. Bump on any incompatible change.
PROTOCOL_VERSION = 1

HEADER_SIZE = 9
#: Largest payload the 24-bit length field can carry.
ABSOLUTE_MAX_PAYLOAD = (1 << 24) - 1
#: Default largest DATA payload a peer accepts (each side announces its own in HELLO/WELCOME).
DEFAULT_MAX_FRAME = 64 * 1024
#: Largest OPEN/RESPONSE/HELLO/WELCOME/GOAWAY payload (the JSON "header block").
MAX_HEADER_BLOCK = 64 * 1024
#: Default per-stream flow-control window, in bytes of DATA payload.
DEFAULT_WINDOW = 256 * 1024
#: Largest window a peer may announce or grow a stream to (2**31 - 1, as in HTTP/2).
MAX_WINDOW = (1 << 31) - 1
#: Default cap on concurrently open streams per connection.
DEFAULT_MAX_STREAMS = 4096
#: Largest binary WebSocket message a sender should build when coalescing frames.
MAX_MESSAGE = 1024 * 1024
MAX_STREAM_ID = (1 << 31) - 1

#: Heartbeat text messages. Either side may send PING at any time; the receiver answers PONG.
PING = "ping"
PONG = "pong"


class FrameType(enum.IntEnum):
    HELLO = 0x1  # bridge -> relay, stream 0: JSON; version, node token, routes, window, max_frame
    WELCOME = 0x2  # relay -> bridge, stream 0: JSON; session accepted, limits, heartbeat interval
    OPEN = 0x3  # relay -> bridge: JSON request head (method, route, target, headers); opens a stream
    RESPONSE = 0x4  # bridge -> relay: JSON response head (status, headers)
    DATA = 0x5  # either way: body bytes; END_STREAM flag marks the last
    RESET = 0x6  # either way: u32 error code + UTF-8 reason; the stream is over in both directions
    WINDOW = 0x7  # either way: u32 credit increment for one stream
    GOAWAY = 0x8  # either way, stream 0: JSON; no new streams (drain or fatal error), then close
    STATS = 0x9  # bridge -> relay, stream 0: JSON object; measurements (requests, GPU, load) to publish


class Flags(enum.IntFlag):
    NONE = 0
    END_STREAM = 0x1  # on OPEN, RESPONSE, DATA: the sender's side of the stream is finished


class ErrorCode(enum.IntEnum):
    NO_ERROR = 0  # graceful: a drain or a shutdown
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


#: HTTP status the relay answers when a stream is reset before its response started.
STATUS_FOR_CODE: dict[int, int] = {
    ErrorCode.NO_ROUTE: 404,
    ErrorCode.UPSTREAM_UNREACHABLE: 502,
    ErrorCode.UPSTREAM_ERROR: 502,
    ErrorCode.UPSTREAM_TIMEOUT: 504,
    ErrorCode.REFUSED_STREAM: 503,
    ErrorCode.TOO_MANY_STREAMS: 503,
    ErrorCode.GOING_AWAY: 503,
    ErrorCode.HEADERS_TOO_LARGE: 431,
    ErrorCode.BODY_TOO_LARGE: 413,
}


_STREAM_FRAMES = frozenset(
    {FrameType.OPEN, FrameType.RESPONSE, FrameType.DATA, FrameType.RESET, FrameType.WINDOW}
)


class Role(enum.Enum):
    RELAY = "relay"  # accepts the WebSocket, receives HELLO, opens streams
    BRIDGE = "bridge"  # dials the WebSocket, sends HELLO, answers streams


Headers = list[tuple[str, str]]


# --------------------------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    type: int
    flags: int
    stream_id: int
    payload: bytes

    def encode(self) -> bytes:
        return encode_frame(self.type, self.flags, self.stream_id, self.payload)


_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def valid_method(method: str) -> bool:
    """Whether ``method`` is an HTTP method token (RFC 9110 section 9.1)."""
    return 0 < len(method) <= 32 and all(c in _TCHAR for c in method)


def encode_frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame's bytes. Raises ValueError for values the header cannot carry."""
    length = len(payload)
    if not (0 <= type_ <= 0xFF and 0 <= flags <= 0xFF):
        raise ValueError("frame type and flags are single bytes")
    if length > ABSOLUTE_MAX_PAYLOAD:
        raise ValueError(f"payload of {length} bytes exceeds the 24-bit length field")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise ValueError(f"stream id {stream_id} out of range")
    return struct.pack(">IBI", (length << 8) | type_, flags, stream_id) + payload


def iter_frames(message: bytes) -> Iterator[Frame]:
    """Split one binary WebSocket message into its frames.

    A message holds one or more whole frames; a frame never spans messages. Raises
    :class:`ProtocolError` (PROTOCOL_ERROR) on a truncated frame or a reserved bit.
    """
    view = memoryview(message)
    offset = 0
    total = len(view)
    if total == 0:
        raise ProtocolError("empty binary message", ErrorCode.PROTOCOL_ERROR)
    while offset < total:
        if total - offset < HEADER_SIZE:
            raise ProtocolError("truncated frame header", ErrorCode.PROTOCOL_ERROR)
        word, flags, stream_id = struct.unpack_from(">IBI", view, offset)
        length, type_ = word >> 8, word & 0xFF
        if stream_id & 0x80000000:
            raise ProtocolError("reserved bit set in stream id", ErrorCode.PROTOCOL_ERROR)
        start = offset + HEADER_SIZE
        end = start + length
        if end > total:
            raise ProtocolError("frame length runs past the end of the message", ErrorCode.PROTOCOL_ERROR)
        yield Frame(type_, flags, stream_id, bytes(view[start:end]))
        offset = end


# ------------------------------------------------------------------------------------- WebSocket records

#: A tunnelled client WebSocket (an OPEN with ``"websocket": true``) carries its messages as records
#: in the stream's DATA bytes: ``u8 opcode, u32 length, payload``. Records may span DATA frames.
WS_TEXT = 0x1  # a text message (UTF-8)
WS_BINARY = 0x2  # a binary message
WS_CLOSE = 0x8  # the closing handshake: u16 close code + UTF-8 reason; END_STREAM follows
WS_RECORD_HEADER = 5
#: Largest message a tunnelled WebSocket carries (either way).
MAX_WS_MESSAGE = 16 * 1024 * 1024


def encode_ws_record(opcode: int, payload: bytes) -> bytes:
    """One WebSocket message as record bytes, to send with ``send_data`` / ``Stream.write``."""
    if opcode not in (WS_TEXT, WS_BINARY, WS_CLOSE):
        raise ValueError(f"unknown WebSocket record opcode {opcode}")
    return struct.pack(">BI", opcode, len(payload)) + payload


def encode_ws_close(code: int, reason: str = "") -> bytes:
    return encode_ws_record(WS_CLOSE, struct.pack(">H", code) + _truncate(reason, 123))


def decode_ws_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a CLOSE record; 1005 (no status) when it carries none."""
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack(">H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class WsRecordReader:
    """Reassembles records from a tunnelled WebSocket's DATA bytes (sans-I/O).

    Call :meth:`feed` with each DATA payload; it returns the complete ``(opcode, payload)`` records.
    Raises ProtocolError (a stream error: reset the stream) on an unknown opcode or an oversized
    message. Call :attr:`pending` at END_STREAM: a partial record then means the peer broke off.
    """

    def __init__(self, max_message: int = MAX_WS_MESSAGE) -> None:
        self._buffer = bytearray()
        self.max_message = max_message

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buffer += data
        out: list[tuple[int, bytes]] = []
        while len(self._buffer) >= WS_RECORD_HEADER:
            opcode, length = struct.unpack_from(">BI", self._buffer)
            if opcode not in (WS_TEXT, WS_BINARY, WS_CLOSE):
                raise ProtocolError(f"unknown WebSocket record opcode {opcode}")
            if length > self.max_message:
                raise ProtocolError(
                    f"WebSocket message of {length} bytes is too large", ErrorCode.BODY_TOO_LARGE
                )
            end = WS_RECORD_HEADER + length
            if len(self._buffer) < end:
                break
            out.append((opcode, bytes(self._buffer[WS_RECORD_HEADER:end])))
            del self._buffer[:end]
        return out


# --------------------------------------------------------------------------------------------- events


@dataclass(slots=True)
class Event:
    """Base class of what :meth:`Connection.receive` returns."""


@dataclass(slots=True)
class HelloReceived(Event):
    """(relay) A bridge said hello. Check ``token``, then call ``accept()`` or ``reject()``."""

    version: int
    token: str
    node: str
    routes: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WelcomeReceived(Event):
    """(bridge) The relay accepted this session. Start the heartbeat at ``heartbeat`` seconds."""

    version: int
    session: str
    heartbeat: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class StreamOpened(Event):
    """(bridge) A request arrived. Forward it to ``route``; DATA events carry its body unless
    ``end_stream`` is already set. Answer with ``send_response()`` or ``send_reset()``."""

    stream_id: int
    method: str
    route: str
    target: str
    headers: Headers
    end_stream: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ResponseReceived(Event):
    """(relay) The head of a stream's response. DATA events follow unless ``end_stream``."""

    stream_id: int
    status: int
    headers: Headers
    end_stream: bool


@dataclass(slots=True)
class DataReceived(Event):
    """Body bytes of a stream. Once the application has consumed them it must call
    ``acknowledge(stream_id, len(data))`` to return the credit to the peer."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class StreamReset(Event):
    """A stream ended abnormally: sent by the peer (``remote=True``) or by this core itself
    (``remote=False``) after the peer broke a stream-level rule. Drop the stream's state."""

    stream_id: int
    code: int
    reason: str
    remote: bool = True


@dataclass(slots=True)
class WindowUpdated(Event):
    """The peer granted more credit on a stream: a sender waiting in ``send_window()`` may go on."""

    stream_id: int
    increment: int


@dataclass(slots=True)
class StatsReceived(Event):
    """(relay) The bridge published measurements: a JSON object whose ``kind`` says what it holds
    (see docs/protocol.md, STATS). Nothing to answer; publish or ignore it."""

    body: dict[str, Any]


@dataclass(slots=True)
class GoAwayReceived(Event):
    """The peer opens (bridge) or accepts (relay) no new streams. Streams up to ``last_stream_id``
    go on; close the WebSocket once they are done (or at once when ``code`` is not NO_ERROR)."""

    code: int
    reason: str
    last_stream_id: int


# --------------------------------------------------------------------------------------------- streams


@dataclass(slots=True)
class _Stream:
    send_window: int  # bytes we may still send
    recv_window: int  # bytes the peer may still send
    recv_unacked: int = 0  # bytes received and consumed but not yet credited back
    local_closed: bool = False  # we sent END_STREAM
    remote_closed: bool = False  # the peer sent END_STREAM
    response_seen: bool = False  # (relay) RESPONSE received / (bridge) RESPONSE sent


def _json(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_HEADER_BLOCK:
        raise ProtocolError(
            f"{what} block of {len(payload)} bytes exceeds {MAX_HEADER_BLOCK}", ErrorCode.HEADERS_TOO_LARGE
        )
    try:
        value = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{what} payload is not valid JSON: {exc}", ErrorCode.PROTOCOL_ERROR) from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} payload must be a JSON object", ErrorCode.PROTOCOL_ERROR)
    return value


def _truncate(text: str, limit: int) -> bytes:
    """UTF-8 of ``text``, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()


def _dump(value: dict[str, Any]) -> bytes:
    data = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if len(data) > MAX_HEADER_BLOCK:
        raise ValueError(f"header block of {len(data)} bytes exceeds {MAX_HEADER_BLOCK}")
    return data


def _headers(value: Any, what: str) -> Headers:
    if not isinstance(value, list):
        raise ProtocolError(f"{what}: headers must be a list", ErrorCode.PROTOCOL_ERROR)
    out: Headers = []
    for item in value:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise ProtocolError(f"{what}: each header must be [name, value]", ErrorCode.PROTOCOL_ERROR)
        name, val = item
        if not name or any(c in name for c in " \t\r\n:") or "\r" in val or "\n" in val or "\0" in val:
            raise ProtocolError(f"{what}: invalid header {name!r}", ErrorCode.PROTOCOL_ERROR)
        out.append((name, val))
    return out


def _field(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"{what}: field {key!r} missing or of the wrong type", ErrorCode.PROTOCOL_ERROR)
    return value


# --------------------------------------------------------------------------------------------- core


class Connection:
    """One end of a tunnel connection: the protocol's state, with no I/O.

    Feed every binary WebSocket message to :meth:`receive`; it returns events and may queue frames
    (a RESET for a stream the peer misused). After every call that may queue frames (``receive`` and
    every ``send_*``, ``acknowledge``, ``accept``, ``reject``), send :meth:`data_to_send` as binary
    WebSocket messages. A :class:`ProtocolError` from ``receive`` is fatal: send GOAWAY with its code
    (``send_goaway(exc.code, str(exc))``), flush, and close the WebSocket.
    """

    def __init__(
        self,
        role: Role,
        *,
        window: int = DEFAULT_WINDOW,
        max_frame: int = DEFAULT_MAX_FRAME,
        max_streams: int = DEFAULT_MAX_STREAMS,
    ) -> None:
        if not 0 < window <= MAX_WINDOW:
            raise ValueError("window out of range")
        if not 0 < max_frame <= ABSOLUTE_MAX_PAYLOAD:
            raise ValueError("max_frame out of range")
        self.role = role
        self.local_window = window  # what we grant the peer per stream
        self.local_max_frame = max_frame  # largest DATA payload we accept
        self.max_streams = max_streams
        self.peer_window = DEFAULT_WINDOW  # what the peer grants us (known after the handshake)
        self.peer_max_frame = DEFAULT_MAX_FRAME
        self.established = False
        self.goaway_sent = False
        self.goaway_received = False
        self.last_stream_id = 0
        self.streams: dict[int, _Stream] = {}
        self._out: list[bytes] = []
        #: Bytes queued and not yet taken by data_to_send(): senders should wait while it is large.
        self.bytes_queued = 0
        self._hello_seen = False

    # ----------------------------------------------------------------------------------- output

    def data_to_send(self) -> list[bytes]:
        """Queued frames, coalesced into binary WebSocket messages of at most MAX_MESSAGE bytes."""
        if not self._out:
            return []
        messages: list[bytes] = []
        batch: list[bytes] = []
        size = 0
        for frame in self._out:
            if batch and size + len(frame) > MAX_MESSAGE:
                messages.append(b"".join(batch))
                batch, size = [], 0
            batch.append(frame)
            size += len(frame)
        messages.append(b"".join(batch))
        self._out.clear()
        self.bytes_queued = 0
        return messages

    def _queue(self, type_: FrameType, flags: int, stream_id: int, payload: bytes = b"") -> None:
        frame = encode_frame(type_, flags, stream_id, payload)
        self._out.append(frame)
        self.bytes_queued += len(frame)

    # ----------------------------------------------------------------------------------- handshake

    def send_hello(self, token: str, node: str, routes: Iterable[str], **info: Any) -> None:
        """(bridge) First frame of a session. Wait for WelcomeReceived before anything else."""
        self._require(Role.BRIDGE, "send HELLO")
        body = {
            "version": PROTOCOL_VERSION,
            "token": token,
            "node": node,
            "routes": list(routes),
            "window": self.local_window,
            "max_frame": self.local_max_frame,
            **info,
        }
        self._queue(FrameType.HELLO, 0, 0, _dump(body))

    def accept(self, session: str, heartbeat: float, **info: Any) -> None:
        """(relay) Answer a HelloReceived with WELCOME; streams may be opened from now on."""
        self._require(Role.RELAY, "send WELCOME")
        body = {
            "version": PROTOCOL_VERSION,
            "session": session,
            "heartbeat": heartbeat,
            "window": self.local_window,
            "max_frame": self.local_max_frame,
            "max_streams": self.max_streams,
            **info,
        }
        self._queue(FrameType.WELCOME, 0, 0, _dump(body))
        self.established = True

    def reject(self, code: int, reason: str) -> None:
        """(relay) Refuse a HelloReceived: queues GOAWAY; close the WebSocket after flushing."""
        self.send_goaway(code, reason)

    # ----------------------------------------------------------------------------------- streams

    def open_stream(
        self,
        stream_id: int,
        method: str,
        route: str,
        target: str,
        headers: Headers,
        *,
        end_stream: bool = False,
        **info: Any,
    ) -> None:
        """(relay) Queue OPEN for a new stream. ``stream_id`` must be above every id used before
        on this connection (use :meth:`next_stream_id`). Send the body with ``send_data``."""
        self._require(Role.RELAY, "open a stream")
        if not self.established:
            raise RuntimeError("no session yet")
        if self.goaway_received or self.goaway_sent:
            raise RuntimeError("connection is going away")
        if stream_id <= self.last_stream_id or stream_id > MAX_STREAM_ID:
            raise ValueError("stream ids must increase")
        body = {
            "method": method,
            "route": route,
            "target": target,
            "headers": [[k, v] for k, v in headers],
            **info,
        }
        self._queue(FrameType.OPEN, Flags.END_STREAM if end_stream else 0, stream_id, _dump(body))
        self.last_stream_id = stream_id
        self.streams[stream_id] = _Stream(self.peer_window, self.local_window, local_closed=end_stream)

    def next_stream_id(self) -> int:
        return self.last_stream_id + 1

    def send_response(
        self, stream_id: int, status: int, headers: Headers, *, end_stream: bool = False
    ) -> None:
        """(bridge) Queue RESPONSE for a stream; send the body with ``send_data``."""
        self._require(Role.BRIDGE, "send RESPONSE")
        stream = self._stream(stream_id)
        if stream.response_seen:
            raise RuntimeError("response already sent")
        body = {"status": status, "headers": [[k, v] for k, v in headers]}
        self._queue(FrameType.RESPONSE, Flags.END_STREAM if end_stream else 0, stream_id, _dump(body))
        stream.response_seen = True
        if end_stream:
            stream.local_closed = True
            self._maybe_forget(stream_id, stream)

    def send_window(self, stream_id: int) -> int:
        """How many DATA bytes may be sent on the stream now (0: wait for WindowUpdated)."""
        stream = self.streams.get(stream_id)
        return stream.send_window if stream is not None and not stream.local_closed else 0

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Queue DATA. ``len(data)`` must not exceed ``send_window(stream_id)``; larger payloads are
        split into frames of at most the peer's max_frame."""
        stream = self._stream(stream_id)
        if stream.local_closed:
            raise RuntimeError("stream already ended")
        if len(data) > stream.send_window:
            raise RuntimeError(f"{len(data)} bytes exceed the send window of {stream.send_window}")
        stream.send_window -= len(data)
        step = self.peer_max_frame
        view = memoryview(data)
        for start in range(0, len(data), step):
            last = start + step >= len(data)
            flags = Flags.END_STREAM if (end_stream and last) else 0
            self._queue(FrameType.DATA, flags, stream_id, bytes(view[start : start + step]))
        if not data and end_stream:
            self._queue(FrameType.DATA, Flags.END_STREAM, stream_id)
        if end_stream:
            stream.local_closed = True
            self._maybe_forget(stream_id, stream)

    def acknowledge(self, stream_id: int, nbytes: int) -> None:
        """Return credit for ``nbytes`` of DATA the application has consumed. WINDOW frames are
        batched: one is queued once half the window has been consumed."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            return
        stream.recv_unacked += nbytes
        if stream.recv_unacked >= self.local_window // 2:
            increment, stream.recv_unacked = stream.recv_unacked, 0
            stream.recv_window += increment
            self._queue(FrameType.WINDOW, 0, stream_id, struct.pack(">I", increment))

    def send_reset(self, stream_id: int, code: int, reason: str = "") -> None:
        """Abort a stream in both directions and forget it. Harmless on an unknown stream."""
        if self.streams.pop(stream_id, None) is None:
            return
        self._queue(FrameType.RESET, 0, stream_id, struct.pack(">I", code) + _truncate(reason, 1024))

    def send_goaway(self, code: int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """No new streams from now on (a drain when code is NO_ERROR, else a fatal error)."""
        self.goaway_sent = True
        self._queue(
            FrameType.GOAWAY,
            0,
            0,
            _dump({"code": int(code), "reason": reason[:1024], "last_stream_id": self.last_stream_id}),
        )

    def send_stats(self, body: dict[str, Any]) -> None:
        """(bridge) Publish measurements to the relay (a JSON object with a ``kind``). Nothing comes
        back. Keep them small and infrequent: they share the WebSocket with every stream. Raises
        ValueError when the JSON exceeds 64 KiB. Kinds the relay understands (bridge/_stats.py;
        every field optional, numbers >= 0, unknown kinds and fields ignored):

        - ``{"kind": "request", "route", "model", "status", "queue_s", "ttft_s", "total_s",
          "tokens_per_s", "prompt_tokens", "prompt_tokens_per_s", "completion_tokens",
          "bytes_in", "bytes_out"}``: one finished request, measured where the bridge forwards it;
        - ``{"kind": "sample", "gpus": [{"index", "name", "memory_used_bytes", "memory_total_bytes",
          "utilization_percent", "temperature_c", "power_w"}], "cpu_percent", "ram_used_bytes",
          "ram_total_bytes"}``: a periodic GPU and host sample;
        - ``{"kind": "node", "models": [...], "gpu_mode", "session_ends_at"}``: facts about the node
          (send on connect and when they change).
        """
        self._require(Role.BRIDGE, "send STATS")
        if not self.established:
            raise RuntimeError("no session yet")
        self._queue(FrameType.STATS, 0, 0, _dump(body))

    # ----------------------------------------------------------------------------------- input

    def receive(self, message: bytes) -> list[Event]:
        """Process one binary WebSocket message; return the events it carried, in order."""
        events: list[Event] = []
        for frame in iter_frames(message):
            event = self._handle(frame)
            if event is not None:
                events.append(event)
        return events

    def _handle(self, frame: Frame) -> Event | None:
        t = frame.type
        if not self.established and t not in (FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY):
            raise ProtocolError(f"frame type {t} before the handshake completed")
        if t == FrameType.STATS:
            if frame.stream_id != 0:
                raise ProtocolError("STATS must be on stream 0")
            if self.role is not Role.RELAY:
                return None  # only relays consume STATS; a bridge ignores it like an unknown frame
            return StatsReceived(_json(frame.payload, "STATS"))
        if t in (FrameType.HELLO, FrameType.WELCOME, FrameType.GOAWAY):
            if frame.stream_id != 0:
                raise ProtocolError(f"frame type {t} must be on stream 0")
            if t == FrameType.HELLO:
                return self._on_hello(frame)
            if t == FrameType.WELCOME:
                return self._on_welcome(frame)
            return self._on_goaway(frame)
        if t not in _STREAM_FRAMES:
            return None  # unknown frame types are ignored, on any stream, for forward compatibility
        if frame.stream_id == 0:
            raise ProtocolError(f"frame type {t} must not be on stream 0")
        if t == FrameType.OPEN:
            return self._on_open(frame)
        if t == FrameType.RESPONSE:
            return self._on_response(frame)
        if t == FrameType.DATA:
            return self._on_data(frame)
        if t == FrameType.RESET:
            return self._on_reset(frame)
        return self._on_window(frame)

    def _on_hello(self, frame: Frame) -> Event:
        self._require(Role.RELAY, "receive HELLO", remote=True)
        if self._hello_seen:
            raise ProtocolError("second HELLO")
        self._hello_seen = True
        body = _json(frame.payload, "HELLO")
        version = _field(body, "version", int, "HELLO")
        routes = body.get("routes", [])
        if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
            raise ProtocolError("HELLO: routes must be a list of strings")
        self._peer_limits(body, "HELLO")
        token = body.get("token", "")
        node = body.get("node", "")
        if not isinstance(token, str) or not isinstance(node, str):
            raise ProtocolError("HELLO: token and node must be strings")
        extra = {
            k: v
            for k, v in body.items()
            if k not in ("version", "token", "node", "routes", "window", "max_frame")
        }
        return HelloReceived(version, token, node[:128], routes, extra)

    def _on_welcome(self, frame: Frame) -> Event:
        self._require(Role.BRIDGE, "receive WELCOME", remote=True)
        if self.established:
            raise ProtocolError("second WELCOME")
        body = _json(frame.payload, "WELCOME")
        version = _field(body, "version", int, "WELCOME")
        session = _field(body, "session", str, "WELCOME")
        heartbeat = _field(body, "heartbeat", (int, float), "WELCOME")
        if not 0.05 <= heartbeat <= 3600:
            raise ProtocolError("WELCOME: heartbeat out of range")
        self._peer_limits(body, "WELCOME")
        self.established = True
        extra = {
            k: v
            for k, v in body.items()
            if k not in ("version", "session", "heartbeat", "window", "max_frame")
        }
        return WelcomeReceived(version, session, float(heartbeat), extra)

    def _peer_limits(self, body: dict[str, Any], what: str) -> None:
        window = body.get("window", DEFAULT_WINDOW)
        max_frame = body.get("max_frame", DEFAULT_MAX_FRAME)
        if not isinstance(window, int) or not 0 < window <= MAX_WINDOW:
            raise ProtocolError(f"{what}: window out of range", ErrorCode.FLOW_CONTROL_ERROR)
        if not isinstance(max_frame, int) or not 0 < max_frame <= ABSOLUTE_MAX_PAYLOAD:
            raise ProtocolError(f"{what}: max_frame out of range", ErrorCode.FRAME_TOO_LARGE)
        # A frame must fit in one WebSocket message of at most MAX_MESSAGE bytes.
        self.peer_window, self.peer_max_frame = window, min(max_frame, MAX_MESSAGE - HEADER_SIZE)

    def _on_goaway(self, frame: Frame) -> Event:
        body = _json(frame.payload, "GOAWAY")
        code = _field(body, "code", int, "GOAWAY")
        reason = body.get("reason", "")
        last = body.get("last_stream_id", 0)
        self.goaway_received = True
        return GoAwayReceived(
            code, reason if isinstance(reason, str) else "", last if isinstance(last, int) else 0
        )

    def _on_open(self, frame: Frame) -> Event | None:
        self._require(Role.BRIDGE, "receive OPEN", remote=True)
        sid = frame.stream_id
        if sid <= self.last_stream_id:
            raise ProtocolError(f"OPEN on stream {sid} does not increase the stream id")
        self.last_stream_id = sid
        body = _json(frame.payload, "OPEN")
        method = _field(body, "method", str, "OPEN")
        route = _field(body, "route", str, "OPEN")
        target = _field(body, "target", str, "OPEN")
        headers = _headers(body.get("headers", []), "OPEN")
        end = bool(frame.flags & Flags.END_STREAM)
        if not valid_method(method) or not target.startswith("/") or any(c in target for c in " \r\n\0"):
            return self._stream_error(sid, ErrorCode.PROTOCOL_ERROR, "OPEN: invalid method or target")
        if self.goaway_sent or len(self.streams) >= self.max_streams:
            code = ErrorCode.REFUSED_STREAM if self.goaway_sent else ErrorCode.TOO_MANY_STREAMS
            self._queue(FrameType.RESET, 0, sid, struct.pack(">I", code) + b"not accepting streams")
            return None
        self.streams[sid] = _Stream(self.peer_window, self.local_window, remote_closed=end)
        extra = {k: v for k, v in body.items() if k not in ("method", "route", "target", "headers")}
        return StreamOpened(sid, method, route, target, headers, end, extra)

    def _on_response(self, frame: Frame) -> Event | None:
        self._require(Role.RELAY, "receive RESPONSE", remote=True)
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            self._unknown_stream(frame)
            return None
        body = _json(frame.payload, "RESPONSE")
        status = body.get("status")
        if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 999:
            return self._stream_error(frame.stream_id, ErrorCode.PROTOCOL_ERROR, "RESPONSE: invalid status")
        try:
            headers = _headers(body.get("headers", []), "RESPONSE")
        except ProtocolError as exc:
            return self._stream_error(frame.stream_id, ErrorCode.PROTOCOL_ERROR, str(exc))
        if stream.response_seen:
            return self._stream_error(frame.stream_id, ErrorCode.PROTOCOL_ERROR, "second RESPONSE")
        stream.response_seen = True
        end = bool(frame.flags & Flags.END_STREAM)
        if end:
            stream.remote_closed = True
            self._maybe_forget(frame.stream_id, stream)
        return ResponseReceived(frame.stream_id, status, headers, end)

    def _on_data(self, frame: Frame) -> Event | None:
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            self._unknown_stream(frame)
            return None
        if stream.remote_closed:
            return self._stream_error(frame.stream_id, ErrorCode.PROTOCOL_ERROR, "DATA after END_STREAM")
        if self.role is Role.RELAY and not stream.response_seen:
            return self._stream_error(frame.stream_id, ErrorCode.PROTOCOL_ERROR, "DATA before RESPONSE")
        size = len(frame.payload)
        if size > self.local_max_frame:
            return self._stream_error(
                frame.stream_id, ErrorCode.FRAME_TOO_LARGE, f"DATA of {size} bytes exceeds max_frame"
            )
        if size > stream.recv_window:
            return self._stream_error(
                frame.stream_id, ErrorCode.FLOW_CONTROL_ERROR, "DATA beyond the flow-control window"
            )
        stream.recv_window -= size
        end = bool(frame.flags & Flags.END_STREAM)
        if end:
            stream.remote_closed = True
            self._maybe_forget(frame.stream_id, stream)
        return DataReceived(frame.stream_id, frame.payload, end)

    def _on_reset(self, frame: Frame) -> Event | None:
        if len(frame.payload) < 4:
            raise ProtocolError("RESET payload shorter than 4 bytes")
        (code,) = struct.unpack_from(">I", frame.payload)
        reason = frame.payload[4:].decode("utf-8", "replace")
        if self.streams.pop(frame.stream_id, None) is None:
            return None  # already gone on our side: nothing to tell the application
        return StreamReset(frame.stream_id, code, reason)

    def _on_window(self, frame: Frame) -> Event | None:
        if len(frame.payload) != 4:
            raise ProtocolError("WINDOW payload must be 4 bytes")
        (increment,) = struct.unpack(">I", frame.payload)
        stream = self.streams.get(frame.stream_id)
        if stream is None:
            return None  # the stream ended meanwhile: a harmless race
        if increment == 0 or stream.send_window + increment > MAX_WINDOW:
            return self._stream_error(frame.stream_id, ErrorCode.FLOW_CONTROL_ERROR, "bad WINDOW increment")
        stream.send_window += increment
        return WindowUpdated(frame.stream_id, increment)

    # ----------------------------------------------------------------------------------- helpers

    def _unknown_stream(self, frame: Frame) -> None:
        if frame.stream_id > self.last_stream_id:
            raise ProtocolError(f"frame type {frame.type} on stream {frame.stream_id} that was never opened")
        return None  # a stream that ended recently: frames in flight are dropped

    def _stream_error(self, stream_id: int, code: ErrorCode, reason: str) -> Event:
        self.streams.pop(stream_id, None)
        self._queue(FrameType.RESET, 0, stream_id, struct.pack(">I", code) + _truncate(reason, 1024))
        return StreamReset(stream_id, code, reason, remote=False)

    def _maybe_forget(self, stream_id: int, stream: _Stream) -> None:
        if stream.local_closed and stream.remote_closed:
            self.streams.pop(stream_id, None)

    def _stream(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None:
            raise KeyError(f"stream {stream_id} is not open")
        return stream

    def _require(self, role: Role, action: str, *, remote: bool = False) -> None:
        if self.role is not role:
            if remote:
                raise ProtocolError(f"a {self.role.value} must not {action}")
            raise RuntimeError(f"a {self.role.value} cannot {action}")
