"""The floor: the cheapest TCP forwarder Python can be, for ``run.py --routes ...,pump``.

Two of these in series (``front`` -> ``back`` -> upstream) have the process topology of relay +
bridge and of frps + frpc, and none of their work: no HTTP parsing, no authentication, no
multiplexing over one connection (each client connection gets its own connection onward), no flow
control, no metering. Bytes go on from ``data_received`` with one ``transport.write``, on uvloop.
What a request costs here is what two Python processes cannot avoid (wake-ups, syscalls, the
event loop); the distance from it to the tunnel is the tunnel's own design, not the language.
It is a measuring stick, not a tunnel: nothing else uses it.

    python benchmarks/pump.py --port 0 --to 127.0.0.1:8000     # prints "READY <port>"
"""

from __future__ import annotations

import argparse
import asyncio
import socket
from typing import cast


class _Side(asyncio.Protocol):
    """One connection of a client/upstream pair: what arrives goes out on the other side."""

    def __init__(self) -> None:
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []  # arrived before the other side connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = self.peer
        if peer is not None and peer.early:
            self.transport.write(b"".join(peer.early))
            peer.early.clear()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.write(data)
        else:
            self.early.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            peer.transport.close()


async def serve(port: int, host: str, to: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    dialling: set[asyncio.Task[None]] = set()

    def accept() -> _Side:
        client, upstream = _Side(), _Side()
        client.peer, upstream.peer = upstream, client

        async def dial() -> None:
            try:
                await loop.create_connection(lambda: upstream, *to)
            except OSError:
                if client.transport is not None:
                    client.transport.close()

        dialling.add(task := loop.create_task(dial()))
        task.add_done_callback(dialling.discard)
        return client

    server = await loop.create_server(accept, host, port)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--to", required=True, help="HOST:PORT to forward to")
    args = parser.parse_args()
    host, _, port = args.to.rpartition(":")
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(args.port, args.host, (host, int(port))))
    else:
        uvloop.run(serve(args.port, args.host, (host, int(port))))


if __name__ == "__main__":
    main()
