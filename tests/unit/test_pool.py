"""Which node a request goes to: :func:`bridge.relay.pool.pick`, a pure function of the nodes and
what the request wants."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bridge import wire
from bridge.relay.pool import NodeSession, Want, models_of, pick, serves


@dataclass
class FakeTunnel:
    """What pick() reads of a node's tunnel: its open streams, whether it is closed, its core."""

    streams: dict[int, object] = field(default_factory=dict)
    closed: bool = False
    conn: wire.Connection = field(default_factory=lambda: _established())


def _established() -> wire.Connection:
    conn = wire.Connection(wire.Role.RELAY)
    conn.accept("s", 5.0)
    return conn


def node(name: str, routes: set[str], *, load: int = 0, models: set[str] = frozenset()) -> NodeSession:  # type: ignore[assignment]
    tunnel = FakeTunnel({i: object() for i in range(load)})
    return NodeSession(tunnel, name, frozenset(routes), "s", 0.0, models=frozenset(models))  # type: ignore[arg-type]


def test_a_node_that_serves_the_route_else_any() -> None:
    a, b = node("a", {"ollama"}, load=5), node("b", {"webui"})
    assert pick([a, b], Want("ollama")) is a  # serves it, busier or not
    assert pick([a, b], Want("nobody")) in (a, b)  # nobody serves it: any (it answers 404 itself)
    assert pick([], Want("ollama")) is None


def test_fewest_open_streams_first_ties_in_turn() -> None:
    a, b, c = node("a", {"r"}, load=2), node("b", {"r"}, load=1), node("c", {"r"}, load=1)
    assert pick([a, b, c], Want("r"), turn=0) is b
    assert pick([a, b, c], Want("r"), turn=1) is c
    assert pick([a, b, c], Want("r"), turn=2) is b


def test_the_model_a_request_names() -> None:
    small = node("small", {"ollama"}, models={"tiny:latest"})
    large = node("large", {"ollama"}, models={"qwen3:8b"}, load=9)
    unknown = node("unknown", {"ollama"})
    nodes = [small, large, unknown]
    assert pick(nodes, Want("ollama", "qwen3:8b")) is large
    assert pick(nodes, Want("ollama", "tiny")) is small  # tiny == tiny:latest
    assert pick(nodes, Want("ollama", "mistral")) is unknown  # nobody lists it: a node that lists nothing
    assert pick([small, large], Want("ollama", "mistral")) in (small, large)  # else any


def test_a_browser_stays_on_its_node() -> None:
    a, b = node("a", {"r"}), node("b", {"r"}, load=3)
    assert pick([a, b], Want("r", sticky="b")) is b
    assert pick([a, b], Want("r", sticky="gone")) is a


@pytest.mark.parametrize("why", ["draining", "closed", "going away", "stream ids used up", "excluded"])
def test_nodes_that_cannot_take_a_stream_get_nothing(why: str) -> None:
    a, b = node("a", {"r"}), node("b", {"r"}, load=7)
    want = Want("r")
    if why == "draining":
        a.draining = True
    elif why == "closed":
        a.tunnel.closed = True  # type: ignore[misc]
    elif why == "going away":
        a.tunnel.conn.goaway_received = True
    elif why == "stream ids used up":
        a.tunnel.conn.last_stream_id = wire.MAX_STREAM_ID
    else:
        want = Want("r", exclude=frozenset({a}))
    assert pick([a, b], want) is b
    assert pick([a], want) is None


def test_model_names_as_bridges_list_them() -> None:
    assert models_of(["a", "", 3, "b" * 200]) == frozenset({"a", "b" * 128})
    assert models_of("not a list") == frozenset()
    assert serves(frozenset({"qwen3:latest"}), "qwen3") and serves(frozenset({"qwen3"}), "qwen3:latest")
    assert not serves(frozenset({"qwen3:8b"}), "qwen3")
