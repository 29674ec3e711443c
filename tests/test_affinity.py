"""Conversation affinity end to end (issue 18): the later turns of a chat land on the replica (a
route's upstreams in one bridge) and on the node (bridges behind one relay) that served its first
turn, while first turns are still spread by load. Real relay, real bridges, the real ``ollama`` and
``openai`` clients; the engines are the stand-in Ollama upstreams (tests/upstreams.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai

from bridge.node.metering import LOG_NAME, read_log

from .procs import API_KEY, Bridge, Relay, start_upstream, stop_all, until
from .test_stats import _metric

TOPICS = ("owls", "rivers", "volcanoes")  # three chats: an odd number, so taking turns cannot line up


def history(topic: str, turn: int) -> list[dict[str, Any]]:
    """A chat's messages at ``turn`` (1-based), the whole history resent as clients do."""
    msgs: list[dict[str, Any]] = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Tell me about {topic}."},
    ]
    for t in range(2, turn + 1):
        msgs += [
            {"role": "assistant", "content": f"Something about {topic}, part {t - 1}."},
            {"role": "user", "content": f"More, part {t}."},
        ]
    return msgs


def test_a_chats_turns_stay_on_one_replica_of_the_bridge(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    (a, url_a), (b, url_b) = start_upstream(token_delay=0.0), start_upstream(token_delay=0.0)
    try:
        relay = make_relay()
        bridge = make_bridge(
            relay,
            {"ollama": f"{url_a},{url_b}"},
            "--listen",
            "127.0.0.1:0",
            "--metrics-dir",
            str(tmp_path / "m"),
            "--sample-interval",
            "0",
        )
        port = bridge.local_port()
        ids: dict[str, list[str]] = {t: [] for t in TOPICS}
        # Turn by turn, one chat after another (no request overlaps another: the load is always
        # equal, so least outstanding alone would take the replicas in turn and split the chats).
        for turn in (1, 2, 3):
            for topic in TOPICS:
                rid = uuid.uuid4().hex
                ids[topic].append(rid)
                host = f"http://127.0.0.1:{port}/r/ollama"
                client = ollama.Client(host=host, headers={"X-Request-Id": rid})
                reply = client.chat(model="tiny", messages=history(topic, turn))
                assert reply.message.content

        def logged() -> dict[str, str]:
            return {
                str(r["request_id"]): str(r["upstream"])
                for r in read_log(tmp_path / "m" / LOG_NAME)
                if r.get("path") == "/api/chat"
            }

        until(lambda: len(logged()) == 9, 10, "9 chat lines in the bridge's log")
        upstream_of = logged()
        placed = {topic: {upstream_of[rid] for rid in rids} for topic, rids in ids.items()}
        assert all(len(ups) == 1 for ups in placed.values()), placed  # each chat on one replica
        assert {next(iter(ups)) for ups in placed.values()} == {url_a, url_b}  # first turns spread
        metrics = httpx.get(f"http://127.0.0.1:{port}/_bridge/metrics", timeout=10).text
        counts = {
            o: _metric(metrics, "bridge_affinity_total", route="ollama", outcome=o)
            for o in ("new", "kept", "unknown", "fallback")
        }
        assert counts == {"new": 3, "kept": 6, "unknown": 0, "fallback": 0}
    finally:
        stop_all([a, b])


def test_a_chats_turns_stay_on_one_node_of_the_relay(
    make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge]
) -> None:
    engine, url = start_upstream(token_delay=0.0)
    try:
        relay = make_relay()
        bridges = {n: make_bridge(relay, {"ollama": url}, "--node-name", n) for n in ("nb-a", "nb-b")}
        nodes: dict[str, list[str]] = {t: [] for t in TOPICS}
        client = openai.OpenAI(base_url=f"{relay.url}/r/ollama/v1", api_key=API_KEY, max_retries=0)
        for turn in (1, 2, 3):
            for topic in TOPICS:
                raw = client.chat.completions.with_raw_response.create(
                    model="tiny",
                    messages=history(topic, turn),  # type: ignore[arg-type]
                )
                assert raw.parse().choices[0].message.content
                nodes[topic].append(raw.headers["x-bridge-node"])
        assert all(len(set(n)) == 1 for n in nodes.values()), nodes  # each chat on one node
        assert {n[0] for n in nodes.values()} == {"nb-a", "nb-b"}  # first turns spread
        # Ollama's shape of the same chat is the same conversation; once its node is gone, the chat
        # goes on on the other node.
        owls = nodes["owls"][0]
        with httpx.Client(base_url=relay.url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            chat = {"model": "tiny", "stream": False, "messages": history("owls", 4)}
            r = http.post("/r/ollama/api/chat", json=chat)
            assert r.status_code == 200 and r.headers["x-bridge-node"] == owls
            bridges[owls].stop()
            until(lambda: http.get("/_relay/status").json()["nodes"] == 1, 15, "the node gone")
            chat["messages"] = history("owls", 5)
            r = http.post("/r/ollama/api/chat", json=chat)
            assert r.status_code == 200 and r.headers["x-bridge-node"] not in ("", owls)
            metrics = http.get("/_relay/metrics").text
        outcomes = ("new", "kept", "unknown", "fallback")
        counts = {o: _metric(metrics, "bridge_relay_affinity_total", outcome=o) for o in outcomes}
        # Turns 2-3 of three chats and one in Ollama's shape kept; the gone node's chats forgotten.
        assert counts == {"new": 3, "kept": 7, "unknown": 1, "fallback": 0}
    finally:
        engine.stop()
