"""Conversation affinity's pure parts: the key of a request body (bridge/affinity.py), the bounded
map and its rule, the relay's node choice with it, and the bridge's replica order and body peek."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bridge.affinity import PEEK_LIMIT, PROMPT_PREFIX, Affinity, Conversation, conversation_key
from bridge.node.upstream import RoutePool, peek
from bridge.relay.pool import Want, pick
from tests.unit.test_pool import node

SYSTEM = {"role": "system", "content": "You are terse."}
K = Conversation("k", follows=True)


def key(body: bytes | None) -> str | None:
    found = conversation_key(body)
    return found.key if found is not None else None


def turns(first: str, n: int, *, system: bool = True, answer: str = "Sure.") -> list[dict[str, Any]]:
    """A chat's messages at turn ``n`` (1-based): the whole history, as clients resend it."""
    msgs: list[dict[str, Any]] = [SYSTEM] if system else []
    msgs.append({"role": "user", "content": first})
    for i in range(2, n + 1):
        msgs += [{"role": "assistant", "content": f"{answer} {i}"}, {"role": "user", "content": f"and {i}?"}]
    return msgs


def ollama_chat(msgs: list[dict[str, Any]]) -> bytes:
    return json.dumps({"model": "gemma3:270m", "messages": msgs, "stream": True}).encode()


def openai_chat(msgs: list[dict[str, Any]]) -> bytes:
    # The OpenAI SDK sends the messages before the model.
    return json.dumps({"messages": msgs, "model": "gemma", "stream": True, "max_tokens": 16}).encode()


def test_every_turn_of_a_chat_has_the_same_key_in_every_api_shape() -> None:
    for shape in (ollama_chat, openai_chat):
        keys = {key(shape(turns("Tell me about owls.", n))) for n in range(1, 6)}
        assert len(keys) == 1 and None not in keys
        follows = [conversation_key(shape(turns("Tell me about owls.", n))) for n in range(1, 4)]
        assert [c.follows for c in follows if c] == [False, True, True]  # turn 1 is a new chat
    # Ollama's and OpenAI's shapes of one chat: the same conversation.
    assert key(ollama_chat(turns("x", 1))) == key(openai_chat(turns("x", 3)))


def test_different_chats_have_different_keys() -> None:
    a = key(ollama_chat(turns("Tell me about owls.", 2)))
    b = key(ollama_chat(turns("Tell me about cats.", 2)))
    c = key(ollama_chat(turns("Tell me about owls.", 2, system=False)))
    assert len({a, b, c}) == 3


def test_the_key_keeps_no_client_text() -> None:
    found = key(ollama_chat(turns("my secret is hunter2", 1)))
    assert found is not None and len(found) == 32 and int(found, 16) >= 0
    assert "hunter2" not in found


def test_list_of_parts_content_and_whitespace_in_the_json() -> None:
    parts = [{"role": "user", "content": [{"type": "text", "text": "Describe this."}]}]
    compact = json.dumps({"messages": parts}, separators=(",", ":")).encode()
    spaced = json.dumps({"messages": [*parts, {"role": "assistant", "content": "A cat."}]}, indent=2).encode()
    assert key(compact) == key(spaced) is not None


def test_a_body_cut_at_the_limit_still_has_its_key() -> None:
    first = ollama_chat(turns("Tell me about owls.", 1))
    long = openai_chat(turns("Tell me about owls.", 400, answer="x" * 500))
    assert len(long) > PEEK_LIMIT
    assert key(long[:PEEK_LIMIT]) == key(first)
    assert key(long) == key(first)  # only the first PEEK_LIMIT bytes count
    cut = conversation_key(long[: len(first) + 30])  # cut inside the second message: a later turn
    assert cut is not None and cut.follows


def test_a_first_user_message_that_does_not_fit_gives_no_key() -> None:
    huge = openai_chat(turns("y" * (PEEK_LIMIT + 10), 1))
    assert key(huge) is None
    # ... unless Open WebUI's chat id came before it.
    with_id = json.dumps({"chat_id": "c-1", "messages": turns("y" * (PEEK_LIMIT + 10), 1)}).encode()
    assert key(with_id) == key(json.dumps({"chat_id": "c-1"}).encode()) is not None


def test_raw_generations_context_and_long_prompts() -> None:
    def gen(**kw: Any) -> bytes:
        return json.dumps({"model": "m", **kw}).encode()

    assert key(gen(prompt="short")) is None  # cheap to compute again: no key
    p = "z" * PROMPT_PREFIX
    assert key(gen(prompt=p)) == key(gen(prompt=p + " more turns")) is not None
    assert key(gen(prompt=p, system="a")) != key(gen(prompt=p, system="b"))
    ctx = list(range(200))
    assert key(gen(prompt="next", context=ctx)) == key(gen(prompt="other", context=[*ctx, 1, 2, 3]))


@pytest.mark.parametrize(
    "body",
    [None, b"", b"[1,2]", b"not json", b'{"messages": "x"}', b'{"messages": [1]}', b'{"messages": [{"role":'],
)
def test_bodies_that_name_no_conversation(body: bytes | None) -> None:
    assert key(body) is None


def test_affinity_keeps_a_target_unless_gone_or_overloaded() -> None:
    aff: Affinity[str] = Affinity(entries=2, skew=2)
    load = {"a": 0, "b": 0}
    assert aff.keep(K, ["a", "b"], load.__getitem__) is None  # not known: least outstanding decides
    aff.served(K, "b")
    assert aff.choose(K, ["a", "b"], load.__getitem__) == ["b", "a"]
    assert aff.keep(Conversation("k", follows=False), ["a", "b"], load.__getitem__) is None  # a first turn
    load["b"] = 2
    assert aff.keep(K, ["a", "b"], load.__getitem__) == "b"  # within the skew
    load["b"] = 3
    assert aff.keep(K, ["a", "b"], load.__getitem__) is None  # overloaded: falls back
    assert aff.keep(K, ["a"], load.__getitem__) is None  # gone
    assert (aff.new, aff.hits, aff.misses, aff.fallbacks) == (1, 2, 1, 2)
    aff.forget("b")
    assert aff.target("k") is None
    assert aff.keep(None, ["a"], load.__getitem__) is None


def test_affinity_is_bounded_least_recently_used_first() -> None:
    aff: Affinity[str] = Affinity(entries=2)
    k1, k2, k3 = (Conversation(f"k{i}", follows=True) for i in (1, 2, 3))
    aff.served(k1, "a")
    aff.served(k2, "a")
    assert aff.keep(k1, ["a"], lambda _: 0) == "a"  # k1 used: k2 is now the oldest
    aff.served(k3, "b")
    assert len(aff) == 2 and aff.target("k2") is None and aff.target("k1") == "a"


def test_the_relay_sends_a_conversation_back_to_its_node() -> None:
    a, b = node("a", {"r"}, load=1), node("b", {"r"}, load=2)
    aff: Affinity[Any] = Affinity(skew=2)
    want = Want("r", conversation=K)
    assert pick([a, b], want, affinity=aff) is a  # not known: least loaded
    aff.served(K, b)
    assert pick([a, b], want, affinity=aff) is b  # its node, though busier
    assert pick([a, b], Want("r", conversation=Conversation("other", True)), affinity=aff) is a
    busy = node("b2", {"r"}, load=4)
    aff.served(K, busy)
    assert pick([a, busy], want, affinity=aff) is a  # overloaded: least loaded
    assert pick([a, b], Want("r", sticky="a", conversation=K), affinity=aff) is a  # a browser's node first


def test_the_bridge_orders_replicas_by_policy() -> None:
    pool = RoutePool("engine", ["http://a", "http://b"], "affinity")
    a, b = pool.upstreams
    a.outstanding = 1
    assert pool.order(K) == [b, a]  # not known: least outstanding
    pool.affinity.served(K, a)
    assert pool.order(K) == [a, b]
    a.failed_at = 1e18  # refused a connection just now: last, whatever the conversation
    assert pool.order(K) == [b, a]
    a.failed_at = 0.0
    least = RoutePool("engine", ["http://a", "http://b"], "least")
    least.affinity.served(K, least.upstreams[1])
    least.upstreams[1].outstanding = 1
    assert least.order(K)[0] is least.upstreams[0]
    rr = RoutePool("engine", ["http://a", "http://b"], "round-robin")
    rr.upstreams[0].outstanding = 5
    first = rr.order(None)[0]
    assert first is rr.upstreams[0]  # load does not matter, only the turn
    rr.picked(first)
    assert rr.order(None)[0] is rr.upstreams[1]
    assert pool.wants_key("POST", [("content-type", "application/json")])
    assert not pool.wants_key("POST", [("content-type", "multipart/form-data")])
    assert not pool.wants_key("GET", [])
    assert not RoutePool("one", ["http://a"]).wants_key("POST", [])


def test_peek_reads_a_bounded_head_and_gives_the_whole_body_back() -> None:
    read: list[int] = []

    async def body(n: int) -> AsyncIterator[bytes]:
        for i in range(n):
            read.append(i)
            yield bytes([65 + i % 26]) * 1000

    async def run(n: int, limit: int) -> tuple[bytes, bytes]:
        head, whole = await peek(body(n), limit)
        return head, b"".join([c async for c in whole])

    head, whole = asyncio.run(run(10, 2500))
    assert head == b"A" * 1000 + b"B" * 1000 + b"C" * 500 and len(whole) == 10_000
    read.clear()

    async def only_head() -> None:
        await peek(body(1000), 2500)

    asyncio.run(only_head())
    assert read == [0, 1, 2]  # no more than the limit read ahead
    head, whole = asyncio.run(run(1, 2500))
    assert head == whole == b"A" * 1000
