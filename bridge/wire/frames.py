"""Frames and header blocks: the bytes of the wire protocol, with no state.

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

HELLO, WELCOME, OPEN, RESPONSE, GOAWAY and STATS carry a JSON object (a "header block") of at most
``MAX_HEADER_BLOCK`` bytes; :func:`encode_block` and :func:`decode_block` are its two directions.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import HeadersTooLarge, LocalProtocolError, ProtocolError
from .constants import ABSOLUTE_MAX_PAYLOAD, HEADER_SIZE, MAX_HEADER_BLOCK, MAX_STREAM_ID, ErrorCode

Headers = list[tuple[str, str]]


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


def valid_target(target: str) -> bool:
    """Whether ``target`` is a request target OPEN may carry: origin-form, no space, CR, LF or NUL."""
    return target.startswith("/") and not any(c in target for c in " \r\n\0")


def encode_frame(type_: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame's bytes. Raises LocalProtocolError for values the header cannot carry."""
    length = len(payload)
    if not (0 <= type_ <= 0xFF and 0 <= flags <= 0xFF):
        raise LocalProtocolError("frame type and flags are single bytes")
    if length > ABSOLUTE_MAX_PAYLOAD:
        raise LocalProtocolError(f"payload of {length} bytes exceeds the 24-bit length field")
    if not 0 <= stream_id <= MAX_STREAM_ID:
        raise LocalProtocolError(f"stream id {stream_id} out of range")
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


# ------------------------------------------------------------------------------------- header blocks


#: ``json.dumps`` with these options builds a new encoder on every call: one, made once.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
#: What a header name (space, tab, CR, LF, colon) and a header value (CR, LF, NUL) must not hold.
_BAD_NAME = re.compile(r"[ \t\r\n:]")
_BAD_VALUE = re.compile(r"[\r\n\0]")


def encode_block(value: dict[str, Any]) -> bytes:
    """A header block's bytes. Raises HeadersTooLarge above MAX_HEADER_BLOCK."""
    data = _encode_json(value).encode()
    if len(data) > MAX_HEADER_BLOCK:
        raise HeadersTooLarge(f"header block of {len(data)} bytes exceeds {MAX_HEADER_BLOCK}")
    return data


def decode_block(payload: bytes, what: str) -> dict[str, Any]:
    """The JSON object of a received header block. Raises ProtocolError."""
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


def decode_headers(value: Any, what: str) -> Headers:
    """A header block's ``headers``: a list of ``[name, value]`` strings. Raises ProtocolError."""
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
        if not name or _BAD_NAME.search(name) or _BAD_VALUE.search(val):
            raise ProtocolError(f"{what}: invalid header {name!r}", ErrorCode.PROTOCOL_ERROR)
        out.append((name, val))
    return out


def required(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """``obj[key]`` when it is of ``kind`` (a bool is no int). Raises ProtocolError."""
    value = obj.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ProtocolError(f"{what}: field {key!r} missing or of the wrong type", ErrorCode.PROTOCOL_ERROR)
    return value


def truncate(text: str, limit: int) -> bytes:
    """UTF-8 of ``text``, cut to at most ``limit`` bytes without splitting a character."""
    raw = text.encode()
    if len(raw) <= limit:
        return raw
    return raw[:limit].decode("utf-8", "ignore").encode()
