"""What README.md promises that no other test checked (issue 22), one test each, against real
processes on loopback: the drain timeout and the second signal, an upstream that does not answer,
the error codes over HTTP, the repeated-request cache, jobs, ``bridge up`` and ``bridge token``, the
``Secure`` cookie behind a proxy, a revoked key's cookie, ``BRIDGE_*`` variables, and the limiter on
wrong node tokens."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bridge import wire as p

from .procs import API_KEY, NODE_TOKEN, ROOT, Bridge, Proc, Relay, bridge_cmd, free_port, until

MakeRelay = Callable[..., Relay]
MakeBridge = Callable[..., Bridge]
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bridge_cmd(*args),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )


# ------------------------------------------------------------------------ 1. draining, a second signal


def test_drain_timeout_running_out_cuts_the_stream_and_the_bridge_exits(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """``--drain-timeout``: on SIGTERM the bridge finishes streams in flight for that long, then
    stops; a stream longer than that is cut (the client sees a broken body, not a complete one)."""
    relay = make_relay("--grace", "1")
    bridge = make_bridge(relay, {"up": upstream}, "--drain-timeout", "2")
    with relay.client() as c, c.stream("GET", "/r/up/stream", params={"n": 600, "interval": 0.05}) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["i"] == 0
        mark = bridge.proc.mark()
        bridge.proc.signal(signal.SIGTERM)
        got = 1
        with pytest.raises(httpx.RemoteProtocolError):  # cut: never a body that looks complete
            for _ in lines:
                got += 1
        code = bridge.proc.wait(30)  # a hang guard; the stream had 30 s left
    assert got < 600, "the stream finished: the drain did not run out"
    assert code == 0, bridge.proc.output[-2000:]
    # It drained (the stream kept flowing after the signal) before it gave up on it.
    assert got > 1
    bridge.proc.wait_for(r"draining: 1 stream\(s\) in flight", 1, start=mark)


def test_a_second_signal_quits_the_draining_bridge_at_once(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """The first SIGTERM starts a drain of up to 300 s; the second quits at once (well within the
    drain: the 30-s wait only catches a bridge that ignored it)."""
    relay = make_relay("--grace", "1")
    bridge = make_bridge(relay, {"up": upstream}, "--drain-timeout", "300")
    with relay.client() as c, c.stream("GET", "/r/up/stream", params={"n": 6000, "interval": 0.05}) as r:
        lines = r.iter_lines()
        assert json.loads(next(lines))["i"] == 0
        mark = bridge.proc.mark()
        bridge.proc.signal(signal.SIGTERM)
        # Handled (two signals sent before the first is handled would arrive as one), and still
        # draining: the stream goes on after the first signal.
        bridge.proc.wait_for(r"draining: 1 stream\(s\) in flight", start=mark)
        assert json.loads(next(lines))["i"] >= 1
        assert bridge.proc.popen.poll() is None
        bridge.proc.signal(signal.SIGTERM)
        bridge.proc.wait(30)
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in lines:
                pass


# ------------------------------------------------------------------------ 2. an upstream that does not answer


@pytest.fixture
def unanswering() -> Iterator[str]:
    """An address whose connection is never completed: a listening socket whose accept queue is
    full, so the kernel drops every further SYN (what a host that went silent looks like)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):  # fill the queue (a backlog of 0 still holds one or two)
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(s)
    probe = socket.socket()
    probe.settimeout(1)
    try:
        with pytest.raises(TimeoutError):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    yield f"http://127.0.0.1:{port}"
    for s in fillers:
        s.close()
    listener.close()


def test_an_upstream_that_does_not_answer_gets_504_upstream_timeout(
    make_relay: MakeRelay, make_bridge: MakeBridge, unanswering: str
) -> None:
    """``--connect-timeout`` for an upstream connection; then 504 and the error body of
    docs/spec/wire.md §9 with code UPSTREAM_TIMEOUT (9)."""
    relay = make_relay()
    make_bridge(relay, {"slow": unanswering}, "--connect-timeout", "1")
    with relay.client() as c:
        r = c.get("/r/slow/api/tags")
    assert r.status_code == 504, r.text
    assert r.json() == {
        "error": "the upstream of route 'slow' did not answer in time; try again shortly",
        "code": p.ErrorCode.UPSTREAM_TIMEOUT,
    }
    assert "127.0.0.1" not in r.text  # the RESET's reason (an address) never reaches the client


# ------------------------------------------------------------------------ 6. bridge up, bridge token


def test_bridge_up_serves_its_routes_with_the_key_it_printed(tmp_path: Path, upstream: str) -> None:
    port = free_port()
    up = Proc(
        bridge_cmd(
            "up",
            "--port",
            str(port),
            "--data-dir",
            str(tmp_path / "data"),
            "--route",
            f"ollama={upstream}",
            "--default-route",
            "ollama",
        ),
        "up",
    )
    try:
        key = up.wait_for(r"key:\s+(bk_\S+)").group(1)
        up.wait_for(rf"route:\s+http://127\.0\.0\.1:{port}/r/ollama/\s+->\s+{re.escape(upstream)}")
        url = f"http://127.0.0.1:{port}"

        def served() -> bool:
            r = httpx.get(url + "/r/ollama/api/tags", headers={"Authorization": f"Bearer {key}"})
            return r.status_code == 200

        until(served, 30, "bridge up to serve its route with the printed key")
        tags = httpx.get(url + "/r/ollama/api/tags", headers={"Authorization": f"Bearer {key}"}).json()
        assert [m["name"] for m in tags["models"]]
        assert httpx.get(url + "/r/ollama/api/tags").status_code == 401
        assert (
            httpx.get(url + "/r/ollama/api/tags", headers={"Authorization": "Bearer bk_x_y"}).status_code
            == 401
        )
        # Its key is listed under the label "bridge up" (a second `bridge up` revokes it).
        listed = _cli("keys", "list", "--data-dir", str(tmp_path / "data"))
        assert listed.returncode == 0 and "bridge up" in listed.stdout and key not in listed.stdout
    finally:
        up.stop()


def test_bridge_token_prints_the_token_a_relay_of_that_data_dir_accepts(
    tmp_path: Path, upstream: str
) -> None:
    data = tmp_path / "data"
    first = _cli("token", "--data-dir", str(data))
    second = _cli("token", "--data-dir", str(data))
    assert first.returncode == 0 and second.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert token == second.stdout.strip() and len(token) >= 32
    relay = Proc(
        bridge_cmd("relay", "--port", "0", "--data-dir", str(data), "--api-keys", API_KEY),
        "relay",
        env={"BRIDGE_NODE_TOKEN": ""},
    )
    bridge: Proc | None = None
    try:
        port = relay.wait_for(r"relay listening on http://127\.0\.0\.1:(\d+)").group(1)
        bridge = Proc(
            bridge_cmd("connect", "--relay", f"ws://127.0.0.1:{port}", "--route", f"up={upstream}"),
            "bridge",
            env={"BRIDGE_NODE_TOKEN": token},
        )
        relay.wait_for(r"bridge \S+ connected from")
        assert httpx.get(f"http://127.0.0.1:{port}/r/up/small", headers=AUTH).status_code == 200
        # A bridge with another token is refused and exits (README: "a wrong token is refused").
        wrong = Proc(
            bridge_cmd("connect", "--relay", f"ws://127.0.0.1:{port}", "--route", f"up={upstream}"),
            "wrong",
            env={"BRIDGE_NODE_TOKEN": NODE_TOKEN},
        )
        assert wrong.wait(30) != 0
    finally:
        if bridge is not None:
            bridge.stop()
        relay.stop()
    assert token not in relay.output and token not in (bridge.output if bridge else "")


# ------------------------------------------------------------------------ 7. the Secure cookie


def test_the_login_cookie_is_secure_behind_a_proxy_that_says_https(make_relay: MakeRelay) -> None:
    relay = make_relay()
    behind = httpx.post(
        relay.url + "/_relay/login",
        data={"key": API_KEY, "next": "/"},
        headers={"X-Forwarded-Proto": "https"},
    )
    plain = httpx.post(relay.url + "/_relay/login", data={"key": API_KEY, "next": "/"})
    assert behind.status_code == plain.status_code == 303
    secure = [a.strip().lower() for a in behind.headers["set-cookie"].split(";")]
    insecure = [a.strip().lower() for a in plain.headers["set-cookie"].split(";")]
    assert secure[0].startswith("bridge_session=") and "secure" in secure
    assert insecure[0].startswith("bridge_session=") and "secure" not in insecure
    assert "httponly" in secure and "httponly" in insecure


# ------------------------------------------------------------------------ 8. a revoked key's cookie


def test_a_login_cookie_stops_working_when_its_key_is_revoked(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    relay = make_relay()
    make_bridge(relay, {"up": upstream})
    added = _cli("keys", "add", "--data-dir", str(relay.data_dir), "--label", "browser")
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    key_id = re.search(r"\(id (\w+);", added.stderr).group(1)  # type: ignore[union-attr]

    def login() -> httpx.Response:
        return httpx.post(relay.url + "/_relay/login", data={"key": key, "next": "/"})

    until(lambda: login().status_code == 303, 15, "the new key to be picked up")
    cookie = login().cookies["bridge_session"]
    assert key not in cookie  # the cookie names the key's id, never the key
    assert httpx.get(relay.url + "/r/up/small", cookies={"bridge_session": cookie}).status_code == 200
    revoked = _cli("keys", "revoke", key_id, "--data-dir", str(relay.data_dir))
    assert revoked.returncode == 0 and f"revoked {key_id}" in revoked.stdout
    # A running relay reads its keys again every 2 s: the cookie stops working then (15 s: a hang guard).
    until(
        lambda: httpx.get(relay.url + "/r/up/small", cookies={"bridge_session": cookie}).status_code == 401,
        15,
        "the revoked key's cookie to be refused",
    )
    assert httpx.get(relay.url + "/r/up/small", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    assert httpx.get(relay.url + "/r/up/small", headers=AUTH).status_code == 200  # other keys unaffected


# ------------------------------------------------------------------------ 3. error codes over HTTP


def test_every_reset_code_reaches_the_client_as_its_status_and_error_body(make_relay: MakeRelay) -> None:
    """docs/spec/wire.md §9 and relay.md §11.5: a stream reset before its answer gets the status of
    the code's row (REFUSED_STREAM, GOING_AWAY and TOO_MANY_STREAMS 503 with ``Retry-After: 5``; a
    code without one 502) and the body ``{"error": words, "code": code}``; the RESET's reason (which
    may name an upstream's address) never reaches the client. A fake bridge (tests/test_hostile.py
    EvilBridge: the real relay in front of it) answers each request with the RESET."""
    from bridge.httprules import failure_words
    from bridge.relay.forward import RETRY_CODES

    from .test_hostile import EvilBridge

    relay = make_relay("--grace", "1")
    evil = EvilBridge(relay)
    reason = b"upstream 10.9.8.7:11434 said: secret-detail"
    seen = {}
    try:
        with relay.client() as c:
            for code in p.ErrorCode:
                if code in (p.ErrorCode.UNAUTHORIZED, p.ErrorCode.UNSUPPORTED_VERSION):
                    continue  # GOAWAY only (§9): never a stream's RESET
                payload = int(code).to_bytes(4, "big") + reason
                # The stream id as EvilBridge's placeholder (it puts in the id of each OPEN).
                frame = p.encode_frame(p.FrameType.RESET, 0, 0x7FFFFFFF, payload)
                evil.answer = [frame[:5] + b"\xff\xff\xff\xff" + payload]
                until(lambda: relay.health()["node_connected"], 15, "the fake bridge (back) on the relay")
                if code in RETRY_CODES:
                    # retry-once (relay.md E.5): a request whose body the relay holds is sent once
                    # more to another node; with none, it waits the grace out: the no-bridge 503.
                    mark = relay.proc.mark()
                    r = c.get("/r/up/x")
                    assert (r.status_code, r.headers["retry-after"]) == (503, "10"), r.text
                    assert r.json() == {"error": "no bridge is connected; try again shortly"}
                    relay.proc.wait_for(r"before answering: retrying once", 5, start=mark)
                    until(lambda: relay.health()["node_connected"], 15, "the fake bridge (back) on the relay")
                    # A body the relay does not hold (streamed) cannot be sent again: the code's answer.
                    r = c.post("/r/up/x", content=iter([b"x" * 65536] * 32))
                else:
                    r = c.get("/r/up/x")
                seen[code.name] = r.status_code
                assert r.status_code == p.STATUS_FOR_CODE.get(code, 502), (code.name, r.status_code, r.text)
                assert r.json() == {"error": failure_words(code, "up")[1], "code": int(code)}, code.name
                assert b"10.9.8.7" not in r.content and b"secret-detail" not in r.content
                if r.status_code == 503:
                    assert r.headers["retry-after"] == "5", code.name
                else:
                    assert "retry-after" not in r.headers, code.name
    finally:
        evil.close()
    assert seen["REFUSED_STREAM"] == seen["GOING_AWAY"] == seen["TOO_MANY_STREAMS"] == 503
    assert seen["NO_ROUTE"] == 404 and seen["UPSTREAM_TIMEOUT"] == 504 and seen["PROTOCOL_ERROR"] == 502


# ------------------------------------------------------------------------ 9. BRIDGE_* variables


def test_bridge_variables_alone_configure_relay_connect_and_validate(tmp_path: Path) -> None:
    """Every flag is also a ``BRIDGE_*`` variable (README's table): a relay, a bridge and a
    validation run configured by variables only (no flag), and ``--suite`` given a JSON file."""
    from .procs import start_upstream

    upstream_proc, upstream = start_upstream(token_delay=0.005)
    port = free_port()
    relay = Proc(
        bridge_cmd("relay"),
        "relay",
        env={
            "BRIDGE_PORT": str(port),
            "BRIDGE_DATA_DIR": str(tmp_path / "relay"),
            "BRIDGE_NODE_TOKEN": NODE_TOKEN,
            "BRIDGE_API_KEYS": API_KEY,
            "BRIDGE_MAX_BODY": "1000",
            "BRIDGE_DEFAULT_ROUTE": "ollama",
        },
    )
    bridge: Proc | None = None
    try:
        relay.wait_for(rf"relay listening on http://127\.0\.0\.1:{port}")
        bridge = Proc(
            bridge_cmd("connect"),
            "bridge",
            env={
                "BRIDGE_RELAY": f"ws://127.0.0.1:{port}",
                "BRIDGE_NODE_TOKEN": NODE_TOKEN,
                "BRIDGE_ROUTE": f"ollama={upstream}",
                "BRIDGE_NODE_NAME": "from-env",
            },
        )
        relay.wait_for(r"bridge from-env connected from")
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as c:
            assert c.get("/small").status_code == 200  # BRIDGE_DEFAULT_ROUTE: served at the root
            assert c.get("/r/ollama/small").headers["x-bridge-node"] == "from-env"
            assert c.post("/r/ollama/sha256", content=b"x" * 999).status_code == 200
            assert c.post("/r/ollama/sha256", content=b"x" * 1001).status_code == 413  # BRIDGE_MAX_BODY
        suite = json.loads((ROOT / "bridge" / "validate" / "prompts" / "v1.json").read_text())
        suite.update(version="env-suite", repetitions=1, concurrency=[1], cases=suite["cases"][:1])
        suite_file = tmp_path / "suite.json"
        suite_file.write_text(json.dumps(suite))
        out = tmp_path / "run"
        done = _cli(
            "validate",
            env={
                "BRIDGE_RELAY": url,
                "BRIDGE_KEY": API_KEY,
                "BRIDGE_MODEL": "tiny",
                "BRIDGE_OUT": str(out),
                "BRIDGE_SUITE": str(suite_file),
            },
        )
        assert done.returncode == 0, done.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["suite"]["version"] == "env-suite"
        case = suite["cases"][0]["id"]
        assert [r["case"] for r in results["requests"]] == [case] and results["requests"][0]["ok"]
    finally:
        if bridge is not None:
            bridge.stop()
        relay.stop()
        upstream_proc.stop()


# ------------------------------------------------------------------------ 10. wrong node tokens


async def _guess_tokens(relay: Relay, n: int) -> None:
    """``n`` hand-made bridges with wrong node tokens, each refused (GOAWAY UNAUTHORIZED, 4401)."""
    from .test_hostile import _hello

    for i in range(n):
        events, code = await _hello(relay, f"wrong-token-{i}", "guesser")
        assert code == 4401 and any(
            isinstance(e, p.GoAwayReceived) and e.code == p.ErrorCode.UNAUTHORIZED for e in events
        ), i


def test_ten_wrong_node_tokens_alone_lock_their_address_out_and_no_other(make_relay: MakeRelay) -> None:
    """README: ten failed authentications a minute from one address (wrong node tokens alone here)
    and the address is refused (the eleventh guess is not even checked); another address is not."""
    from websockets.exceptions import InvalidStatus

    relay = make_relay("--grace", "0.5")
    asyncio.run(_guess_tokens(relay, 10))
    assert relay.proc.output.count("refused: wrong node token") == 10
    mark = relay.proc.mark()
    try:  # refused at the handshake (429) or after its HELLO (GOAWAY): either way not checked
        asyncio.run(_guess_tokens(relay, 1))
    except InvalidStatus as refused:
        assert refused.response.status_code == 429 and int(refused.response.headers["retry-after"]) <= 60
    relay.proc.wait_for(r"refused: too many", 10, start=mark)
    assert "refused: wrong node token" not in "\n".join(relay.proc.lines[mark:])
    # Another address with the right key is not limited: it waits for a bridge (503), no 429.
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), headers=AUTH, timeout=30)
    with other:
        r = other.get(relay.url + "/r/up/small")
    assert r.status_code == 503 and r.json() == {"error": "no bridge is connected; try again shortly"}


def test_wrong_node_tokens_never_lock_out_the_bridge_nor_the_clients_of_that_address(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """The limiter's effect on the bridge's own reconnect: none. After ten wrong node tokens from
    its address, the real bridge (the right token) connects at once and serves, and the address's
    clients with the right key are served (node-token failures are counted apart, the right
    credential is always accepted: docs/security.md §7)."""
    relay = make_relay("--grace", "5")
    asyncio.run(_guess_tokens(relay, 12))
    make_bridge(relay, {"up": upstream})  # waits for "connected" on the relay (30 s: a hang guard)
    with relay.client() as c:
        assert c.get("/r/up/small").status_code == 200


# ------------------------------------------------------------------------ 4. the repeated-request cache


def _generations(upstream: str) -> int:
    """How many generations the stand-in Ollama ran (its ``/_counts``)."""
    count: int = httpx.get(upstream + "/_counts", timeout=10).json()["generations"]
    return count


CHAT = {"model": "tiny", "stream": False, "messages": [{"role": "user", "content": "hi"}]}


def _chat(c: httpx.Client, key: str) -> httpx.Response:
    r = c.post("/r/up/api/chat", json=CHAT, headers={"Idempotency-Key": key})
    assert r.status_code == 200, r.text
    return r


def test_idempotency_ttl_replays_then_expires_and_zero_turns_it_off(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """``--idempotency-ttl``: a repeat within it is replayed (one generation), after it a new one;
    ``0`` turns sharing off (every repeat generates, no ``X-Bridge-Idempotent``)."""
    relay = make_relay("--idempotency-ttl", "4")
    make_bridge(relay, {"up": upstream})
    with relay.client() as c:
        before = _generations(upstream)
        first = _chat(c, "ttl-a")
        again = _chat(c, "ttl-a")
        assert (first.headers["x-bridge-idempotent"], again.headers["x-bridge-idempotent"]) == (
            "new",
            "replayed",
        )
        assert again.content == first.content and _generations(upstream) == before + 1
        # Once the answer is older than the TTL, the same request generates again (30 s: a hang guard).
        until(lambda: _chat(c, "ttl-a").headers["x-bridge-idempotent"] == "new", 30, "the answer to expire")
        assert _generations(upstream) >= before + 2
    off = make_relay("--idempotency-ttl", "0", data_dir=relay.data_dir.parent / "off")
    make_bridge(off, {"up": upstream})
    with off.client() as c:
        before = _generations(upstream)
        answers = [_chat(c, "ttl-off") for _ in range(3)]
        assert all("x-bridge-idempotent" not in r.headers for r in answers)
        assert _generations(upstream) == before + 3


def test_idempotency_entries_bounds_the_answers_kept(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """``--idempotency-entries 2``: a third answer evicts the oldest, which then generates again."""
    relay = make_relay("--idempotency-entries", "2")
    make_bridge(relay, {"up": upstream})
    with relay.client() as c:
        for key in ("e-1", "e-2", "e-3"):
            assert _chat(c, key).headers["x-bridge-idempotent"] == "new"
        assert _chat(c, "e-3").headers["x-bridge-idempotent"] == "replayed"
        assert _chat(c, "e-2").headers["x-bridge-idempotent"] == "replayed"
        before = _generations(upstream)
        assert _chat(c, "e-1").headers["x-bridge-idempotent"] == "new"  # evicted: generated again
        assert _generations(upstream) == before + 1


def test_an_answer_over_8_mib_is_not_replayed(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """At most 8 MiB per kept answer: a larger one reaches its client whole and is not replayed."""
    relay = make_relay()
    make_bridge(relay, {"up": upstream})
    size = (8 << 20) + 4096
    block = bytes(range(256)) * 256
    expected = (block * (size // len(block) + 1))[:size]
    with relay.client() as c:
        for _ in range(2):
            r = c.get(f"/r/up/bytes/{size}", headers={"Idempotency-Key": "big-answer"})
            assert r.status_code == 200 and r.content == expected
            assert r.headers["x-bridge-idempotent"] == "new"  # never "replayed": too large to keep


async def test_a_shared_answer_over_8_mib_reaches_a_joined_client_whole_in_bounded_memory(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """Two clients of one >8 MiB shared answer (the second joins it in flight), reading at once:
    both get every byte, and the relay does not hold the answer (its memory grows by well under
    the answer's size)."""
    import psutil

    relay = make_relay()
    await asyncio.to_thread(make_bridge, relay, {"up": upstream})
    size = 64 << 20
    rss = psutil.Process(relay.proc.popen.pid)
    before = rss.memory_info().rss
    peak = [before]
    first_bytes = asyncio.Event()

    async def read(c: httpx.AsyncClient, wait_first: bool) -> tuple[str, int]:
        if wait_first:
            await first_bytes.wait()
        got = 0
        async with c.stream("GET", f"/r/up/bytes/{size}", headers={"Idempotency-Key": "huge"}) as r:
            async for chunk in r.aiter_raw():
                got += len(chunk)
                first_bytes.set()
                peak[0] = max(peak[0], rss.memory_info().rss)
            return r.headers["x-bridge-idempotent"], got

    async with relay.aclient() as a, relay.aclient() as b:
        results = await asyncio.wait_for(asyncio.gather(read(a, False), read(b, True)), 120)
    assert list(results) == [("new", size), ("joined", size)]
    assert peak[0] - before < 24 << 20, f"the relay grew by {(peak[0] - before) >> 20} MiB"


# ------------------------------------------------------------------------ 5. jobs


def test_a_job_whose_upstream_fails_is_failed(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    relay = make_relay()
    make_bridge(relay, {"up": upstream, "dead": "http://127.0.0.1:9"})
    with relay.client() as c:
        job = c.post("/_relay/jobs", json={"route": "dead", "path": "/api/chat", "body": CHAT})
        assert job.status_code == 202, job.text
        done = c.get(job.json()["url"], params={"wait": 30}).json()
    assert done["state"] == "failed", done
    assert done["error"] and done["finished_at"], done


def test_a_job_submission_over_1_mib_gets_413(make_relay: MakeRelay) -> None:
    from bridge.relay.jobs import MAX_SUBMISSION

    relay = make_relay()
    body = {"route": "up", "path": "/sha256", "body": "x" * (MAX_SUBMISSION + 1)}
    with relay.client() as c:
        r = c.post("/_relay/jobs", json=body)
        assert r.status_code == 413, r.text
        # Streamed without a length, it is refused as it arrives too (never read in full).
        raw = json.dumps(body).encode()
        r = c.post("/_relay/jobs", content=iter([raw[i : i + 65536] for i in range(0, len(raw), 65536)]))
        assert r.status_code == 413, r.text
        assert c.get("/_relay/jobs").json()["jobs"] == []


def test_a_finished_job_is_forgotten_job_ttl_seconds_after_it_finished(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """``--job-ttl``: counted from when the job finished, and applied on every request (a poll
    too, not only a new submission)."""
    relay = make_relay("--job-ttl", "3")
    make_bridge(relay, {"up": upstream})
    with relay.client() as c:
        # A job that runs longer than the TTL: still there when it finishes.
        slow = c.post(
            "/_relay/jobs", json={"route": "up", "method": "GET", "path": "/stream?n=40&interval=0.1"}
        )
        done = c.get(slow.json()["url"], params={"wait": 30}).json()
        assert done["state"] == "done", done
        assert c.get(slow.json()["url"]).status_code == 200
        # Then gone after the TTL, seen by a poll alone (30 s: a hang guard).
        until(lambda: c.get(slow.json()["url"]).status_code == 404, 30, "the job to expire")
