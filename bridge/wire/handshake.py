"""The bodies of the connection-level frames (HELLO, WELCOME, GOAWAY), sans I/O: built and checked.

:class:`~bridge.wire.connection.Connection` keeps the state (who may send which frame, when); the
functions here only turn arguments into a header block and a frame's payload into an event and the
peer's limits. Each ``parse_*`` raises :class:`ProtocolError` for a body the protocol forbids
(docs/protocol.md, "Handshake" and "GOAWAY").
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ProtocolError
from .constants import (
    ABSOLUTE_MAX_PAYLOAD,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    HEADER_SIZE,
    MAX_MESSAGE,
    MAX_WINDOW,
    PROTOCOL_VERSION,
    ErrorCode,
)
from .events import GoAwayReceived, HelloReceived, WelcomeReceived
from .frames import decode_block, encode_block, required

#: Longest reason RESET and GOAWAY carry (UTF-8 bytes, characters).
MAX_REASON = 1024


def hello_body(
    token: str, node: str, routes: Iterable[str], window: int, max_frame: int, info: dict[str, Any]
) -> bytes:
    """(bridge) HELLO's payload."""
    body = {
        "version": PROTOCOL_VERSION,
        "token": token,
        "node": node,
        "routes": list(routes),
        "window": window,
        "max_frame": max_frame,
        **info,
    }
    return encode_block(body)


def welcome_body(
    session: str, heartbeat: float, window: int, max_frame: int, max_streams: int, info: dict[str, Any]
) -> bytes:
    """(relay) WELCOME's payload."""
    body = {
        "version": PROTOCOL_VERSION,
        "session": session,
        "heartbeat": heartbeat,
        "window": window,
        "max_frame": max_frame,
        "max_streams": max_streams,
        **info,
    }
    return encode_block(body)


def goaway_body(code: int, reason: str, last_stream_id: int) -> bytes:
    """GOAWAY's payload (the reason cut to :data:`MAX_REASON` characters)."""
    return encode_block({"code": int(code), "reason": reason[:MAX_REASON], "last_stream_id": last_stream_id})


def parse_hello(payload: bytes) -> tuple[HelloReceived, int, int]:
    """HELLO's event and the peer's ``(window, max_frame)``."""
    body = decode_block(payload, "HELLO")
    version = required(body, "version", int, "HELLO")
    routes = body.get("routes", [])
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise ProtocolError("HELLO: routes must be a list of strings")
    window, max_frame = peer_limits(body, "HELLO")
    token = body.get("token", "")
    node = body.get("node", "")
    if not isinstance(token, str) or not isinstance(node, str):
        raise ProtocolError("HELLO: token and node must be strings")
    extra = {
        k: v
        for k, v in body.items()
        if k not in ("version", "token", "node", "routes", "window", "max_frame")
    }
    return HelloReceived(version, token, node[:128], routes, extra), window, max_frame


def parse_welcome(payload: bytes) -> tuple[WelcomeReceived, int, int]:
    """WELCOME's event and the peer's ``(window, max_frame)``."""
    body = decode_block(payload, "WELCOME")
    version = required(body, "version", int, "WELCOME")
    session = required(body, "session", str, "WELCOME")
    heartbeat = required(body, "heartbeat", (int, float), "WELCOME")
    if not 0.05 <= heartbeat <= 3600:
        raise ProtocolError("WELCOME: heartbeat out of range")
    window, max_frame = peer_limits(body, "WELCOME")
    extra = {
        k: v for k, v in body.items() if k not in ("version", "session", "heartbeat", "window", "max_frame")
    }
    return WelcomeReceived(version, session, float(heartbeat), extra), window, max_frame


def peer_limits(body: dict[str, Any], what: str) -> tuple[int, int]:
    """The ``window`` and ``max_frame`` a HELLO or WELCOME grants, checked; ``max_frame`` lowered so
    that a frame fits in one WebSocket message of at most MAX_MESSAGE bytes."""
    window = body.get("window", DEFAULT_WINDOW)
    max_frame = body.get("max_frame", DEFAULT_MAX_FRAME)
    if not isinstance(window, int) or not 0 < window <= MAX_WINDOW:
        raise ProtocolError(f"{what}: window out of range", ErrorCode.FLOW_CONTROL_ERROR)
    if not isinstance(max_frame, int) or not 0 < max_frame <= ABSOLUTE_MAX_PAYLOAD:
        raise ProtocolError(f"{what}: max_frame out of range", ErrorCode.FRAME_TOO_LARGE)
    return window, min(max_frame, MAX_MESSAGE - HEADER_SIZE)


def parse_goaway(payload: bytes) -> GoAwayReceived:
    body = decode_block(payload, "GOAWAY")
    code = required(body, "code", int, "GOAWAY")
    reason = body.get("reason", "")
    last = body.get("last_stream_id", 0)
    return GoAwayReceived(
        code, reason if isinstance(reason, str) else "", last if isinstance(last, int) else 0
    )
