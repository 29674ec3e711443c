"""HTTP header rules shared by the relay and the bridge (RFC 9110 section 7.6.1)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

from .wire.constants import STATUS_FOR_CODE, ErrorCode

#: Hop-by-hop headers: they describe one connection, never travel through a proxy.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


def strip_hop_by_hop(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop hop-by-hop headers and every header the Connection header names."""
    items = list(headers)
    named = {
        token.strip().lower()
        for name, value in items
        if name.lower() == "connection"
        for token in value.split(",")
    }
    return [(k, v) for k, v in items if k.lower() not in HOP_BY_HOP and k.lower() not in named]


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a URL."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def host_of(url: str) -> str:
    return urlsplit(url).netloc


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def header(headers: Iterable[tuple[str, str]], name: str) -> str | None:
    """The first value of a header, by case-insensitive name."""
    name = name.lower()
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def failure_words(code: int, route: str) -> tuple[int, str]:
    """The HTTP status and the message a client gets when a stream fails before its answer, from
    the RESET ``code`` alone: words a user can act on, never the bridge's own reason (which may
    name an upstream's address)."""
    status = STATUS_FOR_CODE.get(code, 502)
    upstream = f"the upstream of route {route!r}"
    words: dict[int, str] = {
        ErrorCode.NO_ROUTE: f"unknown route {route!r}",
        ErrorCode.UPSTREAM_UNREACHABLE: f"the bridge could not reach {upstream} "
        "(unreachable: is it running?); try again shortly",
        ErrorCode.UPSTREAM_TIMEOUT: f"{upstream} did not answer in time; try again shortly",
        ErrorCode.UPSTREAM_ERROR: f"{upstream} failed before answering; try again shortly",
        ErrorCode.REFUSED_STREAM: "the bridge is shutting down or restarting; try again shortly",
        ErrorCode.GOING_AWAY: "the bridge is shutting down or restarting; try again shortly",
        ErrorCode.TOO_MANY_STREAMS: "the bridge is serving as many requests as it can; try again shortly",
        ErrorCode.HEADERS_TOO_LARGE: "request header fields too large",
        ErrorCode.BODY_TOO_LARGE: "request body too large",
    }
    default = f"the bridge could not complete the request (error code {code}); try again shortly"
    return status, words.get(code, default)
