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


def test_ten_wrong_node_tokens_alone_lock_the_address_out_and_the_bridge_keeps_trying(
    make_relay: MakeRelay, make_bridge: MakeBridge, upstream: str
) -> None:
    """README: ten failed authentications a minute from one address (node tokens alone here) get
    429 with Retry-After, even for the right token; other addresses are not affected. A real bridge
    from that address is refused 429 on each try and keeps trying with its backoff (a 429 is not a
    wrong token: it does not exit), so it comes back once the minute is over."""
    import websockets
    from websockets.exceptions import InvalidStatus

    from .test_hostile import _hello

    relay = make_relay("--grace", "0.5")

    async def guess_then_knock() -> None:
        for i in range(10):
            events, code = await _hello(relay, f"wrong-token-{i}", "guesser")
            assert code == 4401 and any(
                isinstance(e, p.GoAwayReceived) and e.code == p.ErrorCode.UNAUTHORIZED for e in events
            ), i
        # The eleventh, with the right token: refused at the handshake, before any HELLO.
        async with websockets.connect(relay.ws_url + "/_relay/connect"):
            pass

    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(guess_then_knock())
    assert refused.value.response.status_code == 429
    retry_after = int(refused.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    # The same address's client with the right key: 429 too; another address: not limited (503:
    # no bridge is connected).
    assert httpx.get(relay.url + "/r/up/small", headers=AUTH).status_code == 429
    other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), headers=AUTH, timeout=30)
    with other:
        assert other.get(relay.url + "/r/up/small").status_code == 503
    # A real bridge from the locked-out address: refused each try, never exits, keeps trying.
    bridge = make_bridge(relay, {"up": upstream}, wait=False)
    until(lambda: bridge.proc.output.count("429") >= 3, 30, "three refused tries")
    assert bridge.proc.popen.poll() is None, bridge.proc.output[-2000:]
    assert "reconnecting in" in bridge.proc.output
    assert relay.health()["node_connected"] is False
    assert relay.proc.output.count("refused: too many failed attempts") >= 3
