"""What :meth:`bridge.wire.connection.Connection.receive` returns: one event per frame that the
application must act on. Each docstring says what the caller must do next."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .frames import Headers


@dataclass(slots=True)
class Event:
    """Base class of what :meth:`Connection.receive` returns: the session's events (HELLO, WELCOME,
    GOAWAY, STATS) first below, then the streams' (OPEN, RESPONSE, DATA, WINDOW, RESET)."""


@dataclass(slots=True)
class HelloReceived(Event):
    """(relay) A bridge said hello. Check ``version`` and ``token``, then call ``accept()`` (WELCOME)
    or ``reject()`` (GOAWAY with the code; close the WebSocket after sending it)."""

    version: int
    token: str
    node: str
    routes: list[str]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class WelcomeReceived(Event):
    """(bridge) The relay accepted this session: streams may come from now on. Send the heartbeat
    every ``heartbeat`` seconds."""

    version: int
    session: str
    heartbeat: float
    """Seconds between heartbeats; the relay treats three silent intervals as a dead link."""
    info: dict[str, Any] = field(default_factory=dict)
    """WELCOME's other keys: the relay's hints (``coalesce``, ``stats_interval``), to honour or
    ignore."""


@dataclass(slots=True)
class GoAwayReceived(Event):
    """The peer opens (bridge) or accepts (relay) no new streams. Streams up to ``last_stream_id``
    go on; close the WebSocket once they are done (or at once when ``code`` is not NO_ERROR)."""

    code: int
    reason: str
    last_stream_id: int


@dataclass(slots=True)
class StatsReceived(Event):
    """(relay) The bridge published measurements: a JSON object whose ``kind`` says what it holds
    (see docs/protocol.md, STATS). Nothing to answer; publish or ignore it."""

    body: dict[str, Any]


@dataclass(slots=True)
class StreamOpened(Event):
    """(bridge) A request arrived. Forward it to ``route``; DATA events carry its body unless
    ``end_stream`` is already set. Answer with ``send_response()`` or ``send_reset()``. ``info``
    holds OPEN's other keys (``client``: the client's address; ``websocket``: a client WebSocket,
    to answer 101 and carry as records)."""

    stream_id: int
    method: str
    route: str
    target: str
    headers: Headers
    end_stream: bool
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class ResponseReceived(Event):
    """(relay) The head of a stream's response: pass ``status`` and ``headers`` on to the client.
    DATA events carry the body unless ``end_stream`` is already set."""

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
class WindowUpdated(Event):
    """The peer granted more credit on a stream: a sender waiting in ``send_window()`` may go on."""

    stream_id: int
    increment: int


@dataclass(slots=True)
class StreamReset(Event):
    """A stream ended abnormally: sent by the peer (``remote=True``) or by this core itself
    (``remote=False``) after the peer broke a stream-level rule. Drop the stream's state."""

    stream_id: int
    code: int
    reason: str
    remote: bool = True
