"""The bridge's HTTP/1.1 client toward its upstreams (Ollama, Open WebUI, an engine on loopback).

Why not a library: aiohttp's client (used until issue 18) was about a third of the bridge's CPU per
small request on the 2-core benchmark machine (its request and response objects, cookie and
redirect machinery, and timers are made for every request); httpx's pool cost more. What the bridge
needs is narrow: forward a request exactly as the client sent it (no headers of its own, no cookies,
no decompression, no redirects followed) and stream the answer's bytes as they arrive. The parsing,
the part that must be right, is httptools (llhttp, the parser of Node.js, which uvicorn uses too);
this package only keeps connections and moves bytes.

What it does, checked against aiohttp's client (client_reqrep.py, connector.py) and RFC 9112:

- One pool of kept-alive connections per (host, port, https), the most recently used first; a
  connection idle for :data:`KEEPALIVE` seconds is not reused (it is closed when the pool next looks
  at its origin, no timer per connection), at most :data:`MAX_IDLE` wait per origin.
- A request body goes as it comes (``Content-Length`` when the client gave one, else chunked); a
  body-less request other than GET, HEAD, OPTIONS and TRACE says ``Content-Length: 0``, as aiohttp
  does. The body is sent while the answer is awaited (an upstream may answer before reading it).
- Interim answers (1xx but 101) are skipped; 101 ends the answer (WebSockets go another way,
  bridge/node/upstream.py ``forward_ws``). A body that ends with the connection (no length, not
  chunked) is read until then. The answer to HEAD has no body: its connection is not reused, since
  httptools cannot be told to skip the body its ``Content-Length`` announces.
- An upstream that reads faster than the tunnel carries is paused once :data:`READ_HIGH_WATER` bytes
  wait, and resumed when they went on.
- A kept-alive connection the upstream closed while it was idle (the race every client has) is
  retried once on a new connection, for a request without a body, when no byte of the answer came.

Errors: :class:`~bridge.errors.UpstreamUnreachable` when no connection could be made (``timeout``
set when it took longer than the connect timeout), :class:`~bridge.errors.UpstreamError` when the
connection failed or the upstream answered something that is not HTTP/1.1.

The rooms: :mod:`.connection` is one connection and the answer it carries (an asyncio.Protocol fed to
httptools, flow control both ways); :mod:`.pool` is the :class:`Client`: the kept-alive pool per
origin, the request's head and the sending of its body.
"""

from .connection import READ_HIGH_WATER, WRITE_HIGH_WATER, Response
from .pool import KEEPALIVE, MAX_IDLE, Client, Origin, origin

__all__ = [
    "KEEPALIVE",
    "MAX_IDLE",
    "READ_HIGH_WATER",
    "WRITE_HIGH_WATER",
    "Client",
    "Origin",
    "Response",
    "origin",
]
