"""The relay's server pieces that need no sockets: the transport a held response head goes
through (bridge/relay/server.py), so that a small response leaves in one write."""

from __future__ import annotations

from bridge.relay.server import _Held


class Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str) -> str:
        return name


def test_a_held_head_is_kept_and_goes_out_with_the_first_body_write() -> None:
    transport = Transport()
    holding = _Held(transport)
    holding.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert transport.writes == []
    body = _Held(transport, b"".join(holding.parts))
    body.write(b"5\r\nhello\r\n0\r\n\r\n")
    body.write(b"more")
    body.release()
    assert transport.writes == [b"HTTP/1.1 200 OK\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"more"]
    assert body.get_extra_info("peername") == "peername"  # the rest is the real transport's


def test_a_held_head_is_written_before_a_close_or_on_release() -> None:
    transport = Transport()
    _Held(transport, b"HEAD").close()
    assert transport.writes == [b"HEAD"] and transport.closed
    transport = Transport()
    held = _Held(transport, b"HEAD")
    held.release()
    held.release()
    assert transport.writes == [b"HEAD"]
    transport = Transport()
    transport.closed = True
    _Held(transport, b"HEAD").release()  # the client is gone: nothing to write to
    assert transport.writes == []
