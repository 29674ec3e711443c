"""Every exception the package raises on purpose, in one flat tree (as httpx does)::

    BridgeError
    ├── ProtocolError        the peer broke the wire protocol; the connection must close
    ├── LocalProtocolError   this side asked the core for something the protocol forbids (a bug)
    │   └── HeadersTooLarge  a header block above the limit (MAX_HEADER_BLOCK): 431 for a request
    ├── StreamError          one stream failed (reset by the peer, by us, or its connection went away)
    ├── RequestRefused       a request the bridge answers itself is refused (an HTTP status and message)
    ├── SharedOverflow       a shared answer outgrew its limit: a reader who comes later cannot join it
    ├── UpstreamError        the bridge's connection to an upstream failed, or it did not speak HTTP/1.1
    │   └── UpstreamUnreachable  no connection to the upstream could be made (refused, or not in time)
    ├── AuthError            a node token or client key was missing or wrong
    ├── ConfigError          a command-line flag or environment variable makes no sense
    └── DeployError          a deployment (``bridge deploy cloudflare``) failed: Cloudflare's API said no

The sans-I/O core (:mod:`bridge.wire`) raises :class:`ProtocolError` for what the peer sent and
:class:`LocalProtocolError` for what its caller asked, never a bare ``ValueError``: a caller catches
:class:`HeadersTooLarge` to answer 431 without also catching its own bugs.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base class of every error this package raises on purpose."""


class ProtocolError(BridgeError):
    """The peer sent something the protocol forbids.

    ``code`` is the error code (see :class:`bridge.wire.constants.ErrorCode`) the caller must put in
    the GOAWAY frame it sends before closing the WebSocket (or in the RESET of the one stream it
    concerns, where the core says it is a stream error).
    """

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class LocalProtocolError(BridgeError):
    """This side asked the core for something the protocol forbids: a frame field out of range, a
    stream id that does not increase, DATA beyond the send window or after the stream ended, a frame
    before the session is established. A bug of the caller, not of the peer."""


class HeadersTooLarge(LocalProtocolError):
    """A header block (OPEN, RESPONSE, HELLO, WELCOME, GOAWAY, STATS) would exceed
    ``MAX_HEADER_BLOCK`` bytes of JSON: the relay answers such a request 431, the bridge resets
    such a response."""


class StreamError(BridgeError):
    """A stream ended abnormally. ``code`` is the RESET code, ``reason`` its human-readable text."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"stream reset: code {code}" + (f" ({reason})" if reason else ""))
        self.code = code
        self.reason = reason


class RequestRefused(BridgeError):
    """A request the bridge answers itself (Ollama's API in front of an OpenAI-only engine,
    bridge/ollama/) is refused: ``status`` and ``message`` are the HTTP answer the client gets,
    as ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SharedOverflow(BridgeError):
    """A response shared by repeated requests outgrew the cache's per-entry limit and dropped its
    start: a reader who comes later cannot join it (those already reading get it whole)."""


class UpstreamError(BridgeError):
    """The bridge's HTTP client (bridge/node/http1/) lost its connection to an upstream, or the
    upstream answered something that is not HTTP/1.1. The message may name the upstream's address:
    it goes to the bridge's log, never into what the client is told."""


class UpstreamUnreachable(UpstreamError):
    """No connection to an upstream could be made: refused, or (``timeout``) not within the
    connect timeout. The upstream is tried after the others for a while."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


class AuthError(BridgeError):
    """Authentication failed. The message never contains the secret that was presented."""


class ConfigError(BridgeError):
    """Invalid configuration (a bad ``--route``, an unusable data directory, ...)."""


class DeployError(BridgeError):
    """Cloudflare's API refused a deployment step. ``status`` is the HTTP status, ``code`` Cloudflare's
    first error code, ``permission`` the token permission the step needs when the token lacks it.
    The message names the step and the permission, never the token."""

    def __init__(
        self, message: str, *, status: int = 0, code: int | None = None, permission: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.permission = permission
