"""Issue 20: a request on the relay's shared-answer path (a deterministic body, an ``Idempotency-Key``,
a client that joins a generation in flight) fails the same way as a plain one.

The matrix: (plain / deterministic / Idempotency-Key / joined late) x (the upstream hangs up before
answering, the upstream breaks off mid-stream, the node is lost before answering, the node lacks the
route), each with the real ``httpx``, ``ollama`` and ``openai`` clients against a real relay and a
real bridge. What must hold: a failure before the answer gives every client (the first and each
that joined) the same complete, well-formed error response as the plain path, in words a user can
act on and without the upstream's address; a failure mid-stream gives every client a broken body
(its HTTP library raises), never a body that looks complete.

The engine is a small fault-injecting HTTP server in the test's own event loop (a stand-in: it only
fails, on cue, so the test decides when the failure happens relative to a client joining).
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import httpx2
import ollama
import openai
import pytest

from .procs import API_KEY, Bridge, Relay, free_port

MakeRelay = Callable[..., Relay]
MakeBridge = Callable[..., Bridge]

MODES = ("plain", "deterministic", "idempotency-key", "joined-late")
FAILURES = ("reset-before-answer", "reset-mid-stream", "node-lost", "route-missing")
CLIENTS = ("httpx", "ollama", "openai")

#: What every client must see, whatever the mode: (status, the JSON body) for a failure before the
#: answer, None for a broken body.
EXPECTED: dict[str, tuple[int, dict[str, Any]] | None] = {
    "reset-before-answer": (
        502,
        {"error": "the upstream of route 'engine' failed before answering; try again shortly", "code": 10},
    ),
    "reset-mid-stream": None,
    "node-lost": (503, {"error": "no bridge is connected; try again shortly"}),
    "route-missing": (404, {"error": "unknown route 'absent'"}),
}


class FaultEngine:
    """STAND-IN for an engine that fails: an HTTP/1.1 server on loopback that reads each POST and
    then, once :attr:`gate` is set, hangs up without answering (``before``) or, after a response
    head and one streamed chunk, hangs up mid-body (``mid``). Other requests (the bridge asking for
    models) get 404 at once."""

    def __init__(self, failure: str) -> None:
        self.failure = failure
        self.gate = asyncio.Event()
        self.arrived = asyncio.Event()  # a generation request reached the engine
        self.streaming = asyncio.Event()  # its first chunk went out (``mid``)
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        """Stop listening and end every connection (each handler returns)."""
        if self._server is not None:
            self._server.close()
        self.gate.set()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
                fields = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (
                        line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:] if line
                    )
                }
                await _read_body(reader, fields)
                if method != "POST":
                    writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                self.requests += 1
                self.arrived.set()
                if self.failure == "mid":
                    sse = "/v1/" in path
                    ctype = b"text/event-stream" if sse else b"application/x-ndjson"
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype)
                    writer.write(b"\r\ntransfer-encoding: chunked\r\n\r\n")
                    piece = _first_piece(sse)
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await writer.drain()
                    self.streaming.set()
                await self.gate.wait()
                writer.transport.abort()  # hang up: no answer, or no end of the body
                return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)


async def _read_body(reader: asyncio.StreamReader, fields: dict[str, str]) -> None:
    if fields.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)
            if size == 0:
                return
    await reader.readexactly(int(fields.get("content-length", "0") or 0))


def _first_piece(sse: bool) -> bytes:
    if sse:
        chunk = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": "tiny",
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": "Hel"}, "finish_reason": None}
            ],
        }
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"
    line = {"model": "tiny", "created_at": "2026-01-01T00:00:00Z", "done": False}
    line["message"] = {"role": "assistant", "content": "Hel"}
    return json.dumps(line).encode() + b"\n"


@dataclass
class Outcome:
    """What one client saw: an error response (status and JSON body), a broken body (the exception
    its library raised), or a whole answer (which no case here may give)."""

    status: int = 0
    body: dict[str, Any] | None = None
    broken: str = ""
    complete: bool = False


async def _ask(client: str, base: str, mode: str, route: str) -> Outcome:
    """One streamed chat request with a real client; never raises."""
    temperature = 0 if mode in ("deterministic", "joined-late") else 0.7
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if mode == "idempotency-key":
        headers["Idempotency-Key"] = "issue-20"
    messages = [{"role": "user", "content": "hi"}]
    try:
        if client == "httpx":
            body = {"model": "tiny", "messages": messages, "options": {"temperature": temperature}}
            async with (
                httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as c,
                c.stream("POST", f"/r/{route}/api/chat", json=body) as r,
            ):
                data = await r.aread()
                if r.status_code != 200:
                    return Outcome(r.status_code, json.loads(data))
                return Outcome(complete=True)
        if client == "ollama":
            oc = ollama.AsyncClient(host=f"{base}/r/{route}", headers=headers, timeout=30)
            async for part in await oc.chat(
                model="tiny", messages=messages, stream=True, options={"temperature": temperature}
            ):
                if part.done:
                    return Outcome(complete=True)
            return Outcome(broken="ended without done")
        ai = openai.AsyncOpenAI(
            base_url=f"{base}/r/{route}/v1",
            api_key=API_KEY,
            timeout=30,
            max_retries=0,
            default_headers={k: v for k, v in headers.items() if k != "Authorization"},
        )
        stream = await ai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, temperature=temperature
        )
        async for _chunk in stream:
            pass
        return Outcome(complete=True)
    except ollama.ResponseError as exc:
        return Outcome(exc.status_code, {"error": exc.error})
    except openai.APIStatusError as exc:
        return Outcome(exc.status_code, exc.response.json())
    except (httpx.TransportError, httpx2.TransportError, openai.APIConnectionError) as exc:
        return Outcome(broken=type(exc).__name__)


def _expect(outcome: Outcome, failure: str, client: str) -> None:
    expected = EXPECTED[failure]
    if expected is None:
        assert outcome.broken and not outcome.complete, outcome
        return
    status, body = expected
    assert not outcome.broken, f"a broken response instead of a clean {status}: {outcome}"
    assert outcome.status == status, outcome
    if client == "ollama":  # the ollama client keeps the "error" field alone
        body = {"error": body["error"]}
    assert outcome.body == body, outcome
    assert "127.0.0.1" not in json.dumps(outcome.body)


async def _wait_line(relay: Relay, pattern: str, start: int) -> None:
    await asyncio.to_thread(relay.proc.wait_for, pattern, 30, start)


@pytest.mark.parametrize("client", CLIENTS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("failure", FAILURES)
async def test_shared_answers_fail_like_plain_ones(
    make_relay: MakeRelay, make_bridge: MakeBridge, failure: str, mode: str, client: str
) -> None:
    engine = FaultEngine("mid" if failure == "reset-mid-stream" else "before")
    url = await engine.start()
    joined = mode == "joined-late"
    route = "absent" if failure == "route-missing" else "engine"
    grace = "1" if failure == "node-lost" else "30"
    relay = await asyncio.to_thread(make_relay, "--grace", grace)
    try:
        bridge: Bridge | None = None
        if not (failure == "route-missing" and joined):
            bridge = await asyncio.to_thread(make_bridge, relay, {"engine": url})
        if failure in ("reset-before-answer", "reset-mid-stream") and not joined:
            engine.gate.set()
        mark = relay.proc.mark()
        first = asyncio.create_task(_ask(client, relay.url, mode, route))
        second: asyncio.Task[Outcome] | None = None
        if joined:
            if failure == "route-missing":  # no bridge yet: the relay holds the first request
                await _poll(lambda: relay.health()["requests_waiting"] == 1, "the request to be held")
            else:
                await asyncio.wait_for(
                    (engine.streaming if failure == "reset-mid-stream" else engine.arrived).wait(), 30
                )
            second = asyncio.create_task(_ask(client, relay.url, mode, route))
            await _wait_line(relay, r"repeated POST \S+ \S+: joined", mark)
        if failure == "node-lost":
            if not joined:
                await asyncio.wait_for(engine.arrived.wait(), 30)
            assert bridge is not None
            bridge.proc.signal(signal.SIGKILL)
        elif failure == "route-missing" and joined:
            await asyncio.to_thread(make_bridge, relay, {"engine": url})
        else:
            engine.gate.set()
        outcomes = [await asyncio.wait_for(first, 60)]
        if second is not None:
            outcomes.append(await asyncio.wait_for(second, 60))
    finally:
        await engine.close()
    for outcome in outcomes:
        _expect(outcome, failure, client)
    if second is not None:
        assert outcomes[0] == outcomes[1]  # the joined client sees exactly what the first one saw
    assert engine.requests <= 1  # one generation, whoever asked


async def _poll(predicate: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(predicate):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("mode", ("plain", "deterministic", "idempotency-key"))
async def test_unreachable_upstream_gives_a_whole_502_without_its_address(
    make_relay: MakeRelay, make_bridge: MakeBridge, mode: str
) -> None:
    """The issue's reproduction: the route's upstream is a closed port."""
    relay = await asyncio.to_thread(make_relay)
    await asyncio.to_thread(make_bridge, relay, {"engine": f"http://127.0.0.1:{free_port()}"})
    outcome = await _ask("httpx", relay.url, mode, "engine")
    assert outcome.status == 502, outcome
    assert outcome.body == {
        "error": "the bridge could not reach the upstream of route 'engine' (unreachable: is it running?); "
        "try again shortly",
        "code": 8,
    }
