"""WebSocket records: how a tunnelled client WebSocket (an OPEN with ``"websocket": true``) carries
its messages in the stream's DATA bytes: ``u8 opcode, u32 length, payload``. Records may span DATA
frames; :class:`WsRecordReader` puts them back together (sans-I/O)."""

from __future__ import annotations

import struct

from ..errors import LocalProtocolError, ProtocolError
from .constants import MAX_WS_MESSAGE, WS_BINARY, WS_CLOSE, WS_RECORD_HEADER, WS_TEXT, ErrorCode
from .frames import truncate

#: The record opcodes a peer may send.
OPCODES = (WS_TEXT, WS_BINARY, WS_CLOSE)


def encode_ws_record(opcode: int, payload: bytes) -> bytes:
    """One WebSocket message as record bytes, to send with ``send_data`` / ``Stream.write``."""
    if opcode not in OPCODES:
        raise LocalProtocolError(f"unknown WebSocket record opcode {opcode}")
    return struct.pack(">BI", opcode, len(payload)) + payload


def encode_ws_close(code: int, reason: str = "") -> bytes:
    """A CLOSE record (the reason cut to the 123 bytes a WebSocket close frame allows)."""
    return encode_ws_record(WS_CLOSE, struct.pack(">H", code) + truncate(reason, 123))


def decode_ws_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a CLOSE record; 1005 (no status) when it carries none."""
    if len(payload) < 2:
        return 1005, ""
    return struct.unpack(">H", payload[:2])[0], payload[2:].decode("utf-8", "replace")


class WsRecordReader:
    """Reassembles records from a tunnelled WebSocket's DATA bytes.

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
            if opcode not in OPCODES:
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
