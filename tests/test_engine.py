"""The embedded engine for real (deployment/engine.py): llama.cpp's OpenAI-compatible server
(llama-cpp-python) on the generated tiny model, behind a real relay and bridge, driven with the real
``openai`` client. At temperature 0, ``max_tokens=N`` must stream exactly N chunks of one readable
token each, the same through the tunnel as straight from the engine, also with several streams at
once; and the bridge's JSONL log must have measured each request.

These tests fail, never skip, when llama-cpp-python is missing (the message names the set-up step,
scripts/setup.d/30-llama-cpp.sh); deselect them with ``-m "not engine"``.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from bridge.node.metering import LOG_NAME, read_log
from deployment.engine import CHATML_TEMPLATE, EmbeddedEngine, EngineError, engine_available, make_tiny_model

from .procs import API_KEY, Bridge, Relay, until

pytestmark = [pytest.mark.engine, pytest.mark.timeout(180)]

#: One token of the tiny model's output: a whole word after a space, or "." or ",".
TOKEN = re.compile(r"^(?: [A-Za-z]+|[.,])$")
PROMPT = "Explain in a few sentences why the sky is blue."


def require_engine() -> None:
    why = engine_available()
    if why:
        pytest.fail(f"{why}; or deselect these tests with -m 'not engine'")


@dataclass
class Served:
    engine: EmbeddedEngine
    relay: Relay
    bridge: Bridge
    metrics: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.relay.url}/r/llm/v1", api_key=API_KEY, max_retries=0)

    def log(self) -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in read_log(self.metrics / LOG_NAME) if r.get("request_id")}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The engine on the tiny model, and a relay + bridge with route ``llm`` to it."""
    require_engine()
    base = tmp_path_factory.mktemp("engine")
    engine = EmbeddedEngine(log_path=base / "engine.log")
    engine.start()
    relay = bridge = None
    try:
        relay = Relay(base / "relay")
        bridge = Bridge(relay, {"llm": engine.url}, "--metrics-dir", str(base / "metrics"))
        yield Served(engine, relay, bridge, base / "metrics")
    finally:
        if bridge is not None:
            bridge.stop()
        if relay is not None:
            relay.proc.stop()
        engine.stop()


def _stream(
    client: openai.OpenAI, n: int, prompt: str = PROMPT, request_id: str = ""
) -> tuple[list[str], list[float], float, str | None]:
    """One streamed chat: the pieces, when each arrived, when the request started, finish reason."""
    start = time.monotonic()
    pieces: list[str] = []
    arrived: list[float] = []
    finish = None
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        stream=True,
        max_tokens=n,
        temperature=0,
        extra_headers={"X-Request-Id": request_id} if request_id else None,
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
                arrived.append(time.monotonic())
            finish = choice.finish_reason or finish
    return pieces, arrived, start, finish


def test_tiny_model_is_reproducible_and_self_describing(tmp_path: Path) -> None:
    import gguf

    a = make_tiny_model(tmp_path / "a.gguf", seed=3)
    b = make_tiny_model(tmp_path / "b.gguf", seed=3)
    c = make_tiny_model(tmp_path / "c.gguf", seed=4)
    assert a.read_bytes() == b.read_bytes()  # byte-identical for a seed
    assert a.read_bytes() != c.read_bytes()
    assert a.stat().st_size < 4 * 2**20
    assert not list(tmp_path.glob("*.part"))
    reader = gguf.GGUFReader(a)

    def field(name: str) -> Any:
        return reader.fields[name].contents()

    assert field("general.architecture") == "llama"
    assert field("tokenizer.ggml.model") == "llama"
    assert field("tokenizer.chat_template") == CHATML_TEMPLATE
    tokens = field("tokenizer.ggml.tokens")
    assert {"<|im_start|>", "<|im_end|>", "<0x0A>", "\u2581sky"} <= set(tokens)
    # Every prefix of a word is a token: the tokenizer can build the word two pieces at a time.
    assert {"\u2581l", "\u2581li", "\u2581lig", "\u2581ligh", "\u2581light", "\u2581lighthouse"} <= set(
        tokens
    )


def test_streams_n_tokens_one_by_one_through_relay_and_bridge(served: Served) -> None:
    client = served.client()
    seen: dict[int, list[str]] = {}
    for n in (1, 7, 64):
        rid = f"engine-test-{uuid.uuid4().hex[:8]}-{n}"  # not a UUID: the stock server would say 400
        pieces, arrived, start, finish = _stream(client, n, request_id=rid)
        assert len(pieces) == n, pieces  # exactly max_tokens, one token a chunk
        assert all(TOKEN.match(p) for p in pieces), pieces
        assert finish == "length"
        seen[n] = pieces
        # The bridge measured it: its JSONL line, found by the request id we sent.
        until(lambda rid=rid: rid in served.log(), 10, f"the bridge's record of {rid}")  # type: ignore[misc]
        rec = served.log()[rid]
        assert rec["route"] == "llm" and rec["status"] == 200 and rec["model"] == "tiny"
        assert rec["path"] == "/v1/chat/completions"
        assert rec["completion_tokens"] == n
        assert 0 < rec["ttft_s"] <= arrived[0] - start  # the bridge sits before the relay hop
    assert seen[7] == seen[64][:7]  # greedy: a longer answer starts with the shorter one

    # Deterministic, and the tunnel neither adds, drops nor reorders: straight from the engine,
    # the same pieces.
    again, *_ = _stream(client, 64)
    direct = openai.OpenAI(base_url=served.engine.openai_url, api_key="unused", max_retries=0)
    straight, *_ = _stream(direct, 64)
    assert again == straight == seen[64]
    whole = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=64, temperature=0
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 64
    assert whole.choices[0].message.content == "".join(seen[64])


def test_a_stream_that_asks_for_usage_ends_with_the_engines_counts(served: Served) -> None:
    """OpenAI's ``stream_options.include_usage`` (which llama-cpp-python 0.3.36 ignores; the engine's
    server adds it): one more chunk with ``choices: []`` and ``usage`` before ``[DONE]``, through
    the relay and bridge as straight from the engine, with the counts the engine gives the same
    request not streamed; without ``stream_options``, no such chunk."""
    messages: Any = [{"role": "user", "content": PROMPT}]
    direct = openai.OpenAI(base_url=served.engine.openai_url, api_key="unused", max_retries=0)
    whole = direct.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0)
    assert whole.usage is not None and whole.usage.prompt_tokens > 0
    for client in (served.client(), direct):
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=9,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        *text, last = chunks
        assert last.choices == [] and last.usage is not None
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
            whole.usage.prompt_tokens,
            9,
            whole.usage.prompt_tokens + 9,
        )
        assert all(c.usage is None and c.choices for c in text)
        assert "".join(c.choices[0].delta.content or "" for c in text) == whole.choices[0].message.content
        assert last.id == text[0].id and last.model == "tiny"
    plain = list(direct.chat.completions.create(model="tiny", messages=messages, max_tokens=9, stream=True))
    assert all(c.choices and c.usage is None for c in plain)
    # /v1/completions too.
    done = direct.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0)
    streamed = list(
        served.client().completions.create(
            model="tiny",
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert streamed[-1].choices == [] and streamed[-1].usage == done.usage


def test_a_long_answer_arrives_while_it_is_generated(served: Served) -> None:
    """Streamed, not buffered: 1,500 tokens take the tiny model a good fraction of a second, and
    the pieces must arrive spread over that time, the first long before the last."""
    pieces, arrived, start, _ = _stream(served.client(), 1500, prompt="Write a short story.")
    assert len(pieces) == 1500
    spread = arrived[-1] - arrived[0]
    assert spread > 0.1 and spread > 0.4 * (arrived[-1] - start), (arrived[0] - start, arrived[-1] - start)
    distinct = len({round(t, 3) for t in arrived})
    assert distinct > 50, f"the pieces came in only {distinct} bursts"


async def test_concurrent_streams_each_get_their_whole_answer(served: Served) -> None:
    """Four streams at once through the tunnel (the engine takes them in turn; its default would
    interrupt a running stream when another arrives): each is whole and equals its answer alone."""
    prompts = [f"[request {i}] Say hello in one short sentence." for i in range(4)]
    alone = [_stream(served.client(), 32, prompt=p)[0] for p in prompts]
    assert len({tuple(a) for a in alone}) > 1, "the prompts should lead to different answers"
    client = openai.AsyncOpenAI(base_url=f"{served.relay.url}/r/llm/v1", api_key=API_KEY, max_retries=0)

    async def one(prompt: str) -> list[str]:
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": prompt}],
            stream=True,
            max_tokens=32,
            temperature=0,
        )
        return [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]

    together = await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    assert list(together) == alone


def test_engine_on_a_given_file_starts_lists_it_and_stops(tmp_path: Path) -> None:
    require_engine()
    model = make_tiny_model(tmp_path / "my-model.gguf", seed=1)
    engine = EmbeddedEngine(model, log_path=tmp_path / "engine.log")
    with engine:
        assert engine.running and engine.model == "my-model"
        r = httpx.get(engine.openai_url + "/models", timeout=10)
        assert [m["id"] for m in r.json()["data"]] == ["my-model"]
        pid, url = engine.proc.pid if engine.proc else 0, engine.url
    assert not engine.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/v1/models", timeout=5)
    engine.stop()  # idempotent
    assert model.exists() and "my-model" in (tmp_path / "engine.log").read_text()

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(EngineError, match=r"exited .* before it was ready(?s:.*)GGUF"):
        EmbeddedEngine(bad).start(timeout=60)


def test_prompt_cache_resumes_several_chats_with_the_same_answers(tmp_path: Path) -> None:
    """``prompt_cache_mib``: two chats taking turns on one engine each resume from their own cached
    prompt (llama-cpp-python logs a cache hit) and get exactly the answers an engine without the
    cache gives; the cache holds KV states only (deployment/engine_server.py ``lean_scores``)."""
    require_engine()
    model = make_tiny_model(tmp_path / "tiny.gguf", seed=0)

    def run(cache_mib: int) -> tuple[list[str], str]:
        answers: list[str] = []
        engine = EmbeddedEngine(
            model, log_path=tmp_path / f"engine-{cache_mib}.log", prompt_cache_mib=cache_mib
        )
        with engine:
            client = openai.OpenAI(base_url=engine.openai_url, api_key="none", max_retries=0)
            chats: list[list[Any]] = [[{"role": "user", "content": f"{PROMPT} {i} " * 12}] for i in range(2)]
            for turn in range(3):
                for messages in chats:
                    reply = client.chat.completions.create(
                        model=engine.model, messages=messages, max_tokens=8, temperature=0
                    )
                    text = reply.choices[0].message.content or ""
                    answers.append(text)
                    messages += [
                        {"role": "assistant", "content": text},
                        {"role": "user", "content": f"And {turn}?"},
                    ]
            return answers, engine.output()

    plain, plain_log = run(0)
    cached, cached_log = run(64)
    assert len(set(plain)) > 1 and cached == plain
    assert "cache hit" not in plain_log
    assert "prompt cache of KV states only" in cached_log
    assert cached_log.count("Llama._create_completion: cache hit") >= 4  # turns 2 and 3 of both chats
