"""The bridge's HTTP/1.1 client (bridge/node/http1/) against real servers on loopback: a scripted
asyncio server that answers byte for byte what each test says (including what real servers do
wrong or at awkward moments), and uvicorn for a real one. The end-to-end paths (refused and
unanswering upstreams, 502 and 504) are in test_promises.py and test_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import pytest
import uvicorn
import uvloop

from bridge.errors import UpstreamError, UpstreamUnreachable
from bridge.node import http1

#: Every test runs on asyncio's own loop and on uvloop's, which the bridge runs on (its transports
#: are not asyncio's classes).
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def on_both_loops(case: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[str], None]:
    @pytest.mark.parametrize("loop", LOOPS)
    def test(loop: str) -> None:
        with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
            runner.run(case())

    test.__name__, test.__doc__ = case.__name__, case.__doc__
    return test


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A loopback server running ``handler`` for every connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> str:
        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await self.handler(reader, writer)
            writer.close()

        self.server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by Content-Length, or chunked), as sent."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"content-length:" in lower:
        n = int(lower.split(b"content-length:")[1].split(b"\r\n")[0])
        return head, await reader.readexactly(n)
    body = b""
    if b"transfer-encoding: chunked" in lower:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            body += (await reader.readexactly(size + 2))[:-2]
            if size == 0:
                return head, body
    return head, body


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def answer_ok_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()


async def body_of(chunks: list[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


async def get(client: http1.Client, url: str, target: str = "/", method: str = "GET") -> tuple[int, bytes]:
    r = await client.request(method, url, target, [("Host", "upstream")])
    body = await r.read()
    r.release()
    return r.status, body


@on_both_loops
async def test_a_kept_alive_connection_serves_the_next_request() -> None:
    server = Scripted(answer_ok_forever)
    async with server as url:
        client = http1.Client(5)
        for _ in range(3):
            assert await get(client, url) == (200, b"ok")
        await client.close()
    assert server.connections == 1


@on_both_loops
async def test_what_goes_out_is_what_the_caller_gave_and_a_target_under_the_base_path() -> None:
    seen: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head + body)
            writer.write(OK)

    async with Scripted(record) as url:
        client = http1.Client(5)
        r = await client.request(
            "POST",
            url + "/base",
            "/api/chat?x=%2F",
            [("Host", "h"), ("X-A", "1"), ("Content-Length", "5"), ("Connection", "keep-alive")],
            body_of([b"he", b"llo"]),
        )
        await r.read()
        r.release()
        r = await client.request("POST", url, "/v1", [("Host", "h")], body_of([b"abc", b"", b"de"]))
        await r.read()
        r.release()
        r = await client.request("DELETE", url, "/x", [("Host", "h")])
        await r.read()
        r.release()
        await client.close()
    assert (
        seen[0]
        == b"POST /base/api/chat?x=%2F HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nContent-Length: 5\r\n\r\nhello"
    )
    assert seen[1] == b"POST /v1 HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nabcde"
    # a body-less request other than GET/HEAD says so, as aiohttp does (some servers wait otherwise)
    assert seen[2] == b"DELETE /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n"


@on_both_loops
async def test_a_header_with_a_line_break_is_never_sent() -> None:
    server = Scripted(answer_ok_forever)
    async with server as url:
        client = http1.Client(5)
        with pytest.raises(UpstreamError):
            await client.request("GET", url, "/", [("Host", "h"), ("X", "a\r\nInjected: 1")])
        await client.close()
    assert server.connections == 0


@on_both_loops
async def test_interim_answers_are_skipped_and_a_body_until_close_is_read_whole() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nX-Final: 1\r\n\r\nuntil ")
        await writer.drain()
        writer.write(b"the end")
        await writer.drain()

    server = Scripted(answer)
    async with server as url:
        client = http1.Client(5)
        r = await client.request("GET", url, "/", [("Host", "h")])
        assert (r.status, r.headers) == (200, [("X-Final", "1")])
        assert await r.read() == b"until the end"
        r.release()  # not reusable: the body ended with the connection
        assert await get(client, url) == (200, b"until the end")
        await client.close()
    assert server.connections == 2


@on_both_loops
async def test_the_answer_to_head_has_no_body_and_its_connection_is_not_reused() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")

    server = Scripted(answer)
    async with server as url:
        client = http1.Client(5)
        assert await get(client, url, method="HEAD") == (200, b"")
        assert await get(client, url, method="HEAD") == (200, b"")
        await client.close()
    assert server.connections == 2


@on_both_loops
async def test_a_kept_alive_connection_closed_as_it_was_reused_is_retried_for_a_bodyless_request() -> None:
    async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()
        await read_request(reader)  # the next request arrives, and the server closes instead

    server = Scripted(once_then_close)
    async with server as url:
        client = http1.Client(5)
        assert await get(client, url) == (200, b"ok")
        assert await get(client, url) == (200, b"ok")  # on a new connection
        assert server.connections == 2
        # with a body, it could have been half sent: the caller hears of it instead
        with pytest.raises(UpstreamError):
            await client.request("POST", url, "/", [("Host", "h")], body_of([b"x"]))
        await client.close()


@on_both_loops
async def test_a_connection_that_fails_mid_body_or_answers_garbage_raises() -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with Scripted(short) as url:
        client = http1.Client(5)
        r = await client.request("GET", url, "/", [("Host", "h")])
        assert r.status == 200
        with pytest.raises(UpstreamError):
            await r.read()
        r.close()
        # Nothing holds the failed answer and its connection in a cycle: reference counting alone
        # frees them (the raised error is a copy; the parser and transport are let go).
        answer, conn = weakref.ref(r), weakref.ref(r._conn)
        gc.disable()
        try:
            del r
            assert answer() is None and conn() is None, "a failed answer waits for the garbage collector"
        finally:
            gc.enable()
    async with Scripted(garbage) as url:
        with pytest.raises(UpstreamError):
            await client.request("GET", url, "/", [("Host", "h")])
        await client.close()


@on_both_loops
async def test_a_refused_connection_is_unreachable_not_a_timeout() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    client = http1.Client(5)
    with pytest.raises(UpstreamUnreachable) as caught:
        await client.request("GET", f"http://127.0.0.1:{port}", "/", [("Host", "h")])
    assert caught.value.timeout is False


@on_both_loops
async def test_an_answer_not_read_pauses_the_upstream_and_every_byte_arrives_in_order() -> None:
    size = 32 * 1024 * 1024
    paused = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.transport.set_write_buffer_limits(high=64 * 1024 * 1024)
        block = bytes(range(256)) * 256  # 64 KiB
        for _ in range(size // len(block)):
            writer.write(b"%x\r\n%b\r\n" % (len(block), block))
            if writer.transport.get_write_buffer_size() > 4 * 1024 * 1024:
                paused.set()  # the client stopped reading: what the kernel cannot take piles up here
            await asyncio.sleep(
                0
            )  # one turn of the loop, in which a client that read all would empty the socket
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with Scripted(flood) as url:
        client = http1.Client(5)
        r = await client.request("GET", url, "/", [("Host", "h")])
        await asyncio.wait_for(paused.wait(), 30)
        total = 0
        async for chunk in r.chunks():
            assert len(chunk) <= http1.READ_HIGH_WATER + 256 * 1024  # held back, not all buffered
            total += len(chunk)
        assert total == size
        r.release()
        await client.close()


@on_both_loops
async def test_a_real_server_uvicorn_streams_through_the_client() -> None:
    async def app(scope: dict, receive: Callable, send: Callable) -> None:  # type: ignore[type-arg]
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 201, "headers": [(b"x-n", b"%d" % len(body))]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"part%d;" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections queue in the kernel until uvicorn accepts: no waiting for it
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    client = http1.Client(5)
    try:
        for _ in range(2):
            r = await client.request(
                "POST", f"http://127.0.0.1:{port}", "/", [("Host", "h")], body_of([b"abc"] * 1000)
            )
            assert r.status == 201 and ("x-n", "3000") in r.headers
            assert await r.read() == b"part0;part1;part2;"
            r.release()
        status, data = await client.get_json(f"http://127.0.0.1:{port}", "/", [("Host", "h")], timeout=5)
        assert (status, data) == (201, None)
    finally:
        await client.close()
        server.should_exit = True
        await task
