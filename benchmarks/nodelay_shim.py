"""Run ``bridge.cli`` with every TCP socket created as ``proto=IPPROTO_TCP``.

``bridge.relay.server.serve`` binds its listening socket as ``socket.socket(family, SOCK_STREAM)`` (proto 0);
accepted connections inherit proto 0, and asyncio only sets TCP_NODELAY on sockets whose proto is
``IPPROTO_TCP``. Without TCP_NODELAY, Nagle's algorithm and the client's delayed ACK add about 40 ms to
every small response. ``run.py --nodelay-shim`` starts the relay through this file to measure the relay
as it would be with that fixed; it changes nothing once the relay sets the option itself.
"""

from __future__ import annotations

import runpy
import socket
import sys

_Socket = socket.socket


class _TCPSocket(_Socket):
    def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:
        if (
            fileno is None
            and type == socket.SOCK_STREAM
            and proto in (-1, 0)
            and family in (socket.AF_INET, socket.AF_INET6)
        ):
            proto = socket.IPPROTO_TCP
        super().__init__(family, type, proto, fileno)


def main() -> None:
    socket.socket = _TCPSocket  # type: ignore[misc]
    sys.argv[0] = "bridge"
    runpy.run_module("bridge.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
