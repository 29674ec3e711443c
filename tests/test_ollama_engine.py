"""Ollama's REST API served by the bridge in front of the real embedded engine (llama.cpp through
llama-cpp-python's OpenAI-compatible server, on the generated tiny model), through a real relay and
bridge (route ``ollama=openai+URL``) and the bridge's local endpoint, driven with the real
``ollama``, ``openai`` and ``httpx`` clients.

The tiny model streams exactly ``N`` readable tokens for ``num_predict=N`` at temperature 0, the same
every time, so what reaches the engine and what comes back can be checked exactly. These tests fail,
never skip, when llama-cpp-python is missing (scripts/setup.d/30-llama-cpp.sh); deselect them with
``-m "not engine"``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from bridge.node.metering import LOG_NAME, read_log
from bridge.ollama.api import OLLAMA_VERSION, SERVED_BY
from deployment.engine import EmbeddedEngine

from .conftest import _assert_no_secret_logged
from .procs import API_KEY, NODE_TOKEN, ROOT, Bridge, Proc, Relay, bridge_cmd, until
from .test_engine import require_engine

pytestmark = [pytest.mark.engine, pytest.mark.timeout(180)]

AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: One token of the tiny model: a whole word after a space, or "." or ",".
TOKEN = re.compile(r"^(?: [A-Za-z]+|[.,])$")
HELLO = [{"role": "user", "content": "Explain in a few sentences why the sky is blue."}]


@dataclass
class Served:
    engine: EmbeddedEngine
    relay: Relay
    bridge: Bridge
    local: str  # the bridge's local endpoint
    metrics: Path

    def client(self, host: str = "") -> ollama.Client:
        return ollama.Client(host=host or self.relay.url + "/r/ollama", headers=AUTH)

    def http(self) -> httpx.Client:
        return self.relay.client()

    def records(self) -> dict[str, dict[str, Any]]:
        return {r["request_id"]: r for r in read_log(self.metrics / LOG_NAME) if r.get("request_id")}


@contextlib.contextmanager
def _served(base: Path, *engine_args: str) -> Iterator[Served]:
    """The engine on the tiny model, a relay, and a bridge with route ``ollama=openai+<engine>``
    and its local endpoint; all stopped at the end."""
    require_engine()
    engine = EmbeddedEngine(log_path=base / "engine.log", extra_args=engine_args)
    engine.start()
    relay = bridge = None
    try:
        relay = Relay(base / "relay")
        routes = {"ollama": "openai+" + engine.url}
        extra = ("--listen", "127.0.0.1:0", "--metrics-dir", str(base / "metrics"), "--sample-interval", "0")
        bridge = Bridge(relay, routes, *extra)
        local = f"http://127.0.0.1:{bridge.local_port()}"
        yield Served(engine, relay, bridge, local, base / "metrics")
        _assert_no_secret_logged(relay.proc, bridge.proc)
    finally:
        if bridge is not None:
            bridge.stop()
        if relay is not None:
            relay.proc.stop()
        engine.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with _served(tmp_path_factory.mktemp("ollama-engine")) as s:
        yield s


def _chat_stream(
    client: ollama.Client, n: int, messages: list[dict[str, str]] = HELLO, **options: Any
) -> tuple[list[str], list[float], Any]:
    """A streamed chat at temperature 0: the pieces, their arrival times, the last line."""
    pieces: list[str] = []
    arrived: list[float] = []
    last: Any = None
    for part in client.chat(
        model="tiny", messages=messages, stream=True, options={"num_predict": n, "temperature": 0, **options}
    ):
        if part.done:
            last = part
            assert not part.message.content  # the last line carries the counters, no text
        else:
            pieces.append(part.message.content or "")
            arrived.append(time.monotonic())
    assert last is not None, "no done line"
    return pieces, arrived, last


# ---------------------------------------------------------------------------------- chat and generate
def test_chat_streams_one_token_a_line_with_ollamas_counters(served: Served) -> None:
    rid = f"ollama-chat-{uuid.uuid4().hex[:8]}"
    client = ollama.Client(host=served.relay.url + "/r/ollama", headers={**AUTH, "X-Request-Id": rid})
    pieces, _, last = _chat_stream(client, 32)
    assert len(pieces) == 32 and all(TOKEN.match(p) for p in pieces), pieces
    assert last.done_reason == "length" and last.model == "tiny"
    # The counters: present, from the engine's run, and adding up.
    assert last.eval_count == 32
    assert last.eval_duration > 0 and last.prompt_eval_duration > 0 and last.load_duration > 0
    assert last.total_duration >= last.load_duration + last.prompt_eval_duration + last.eval_duration
    assert last.total_duration < 30e9
    # The bridge measured the same request from Ollama's lines (its JSONL log, by the request id).
    until(lambda: rid in served.records(), 10, "the bridge's record")
    rec = served.records()[rid]
    assert (rec["path"], rec["status"], rec["model"], rec["completion_tokens"]) == (
        "/api/chat",
        200,
        "tiny",
        32,
    )
    assert rec["tokens_per_s"] == pytest.approx(32 / (last.eval_duration / 1e9), rel=0.01)
    assert 0 < rec["ttft_s"] < last.total_duration / 1e9

    # Not streamed: the same answer in one JSON; and through OpenAI's API on the same route.
    whole = served.client().chat(
        model="tiny", messages=HELLO, stream=False, options={"num_predict": 32, "temperature": 0}
    )
    assert whole.message.content == "".join(pieces) and whole.done and whole.eval_count == 32
    oa = openai.OpenAI(base_url=served.relay.url + "/r/ollama/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in oa.models.list()] == ["tiny"]
    direct = oa.chat.completions.create(model="tiny", messages=HELLO, max_tokens=32, temperature=0)  # type: ignore[arg-type]
    assert direct.choices[0].message.content == "".join(pieces)


def test_a_long_answer_arrives_token_by_token(served: Served) -> None:
    """Streamed as generated, not gathered: 1,500 tokens take the tiny model a good fraction of a
    second, and the lines must arrive spread over that time."""
    pieces, arrived, last = _chat_stream(
        served.client(), 1500, [{"role": "user", "content": "Write a story."}]
    )
    assert len(pieces) == 1500 and last.eval_count == 1500
    spread = arrived[-1] - arrived[0]
    assert spread > 0.1 and spread > 0.3 * last.eval_duration / 1e9, (spread, last.eval_duration)
    assert len({round(t, 3) for t in arrived}) > 50


def test_generate_streamed_and_not_on_the_chat_template(served: Served) -> None:
    client = served.client()
    prompt = "Say hello in one short sentence."
    opts = {"num_predict": 12, "temperature": 0}
    parts = list(client.generate(model="tiny", prompt=prompt, stream=True, options=opts))
    assert [p.done for p in parts] == [False] * 12 + [True]
    text = "".join(p.response or "" for p in parts)
    assert parts[-1].eval_count == 12 and parts[-1].done_reason == "length" and parts[-1].response == ""
    whole = client.generate(model="tiny:latest", prompt=prompt, stream=False, options=opts)
    assert whole.response == text and whole.model == "tiny:latest"  # the name as the client gave it
    # /api/generate formats the prompt with the model's chat template, as Ollama does: the same
    # tokens as a chat with that one user message.
    chat = client.chat(model="tiny", messages=[{"role": "user", "content": prompt}], options=opts)
    assert chat.message.content == text
    raw = client.generate(model="tiny", prompt=prompt, raw=True, options=opts)
    assert raw.eval_count == 12 and raw.response != text  # no template: another prompt


def test_streamed_answers_count_the_prompt_as_the_engine_does(served: Served) -> None:
    """``prompt_eval_count`` on the last line of a streamed chat and generate: the engine's own
    count (its usage chunk, asked for with ``stream_options.include_usage``), the same as the
    engine's ``usage.prompt_tokens`` for the request not streamed and as Ollama's answer not
    streamed; and OpenAI's API on the same route gives the usage chunk to a client that asks."""
    client = served.client()
    opts = {"num_predict": 6, "temperature": 0}
    engine = openai.OpenAI(base_url=served.engine.openai_url, api_key="unused", max_retries=0)
    truth = engine.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert truth.usage is not None and truth.usage.prompt_tokens > 0
    _, _, last = _chat_stream(client, 6)
    whole = client.chat(model="tiny", messages=HELLO, stream=False, options=opts)
    assert last.prompt_eval_count == whole.prompt_eval_count == truth.usage.prompt_tokens
    assert last.eval_count == 6 and 0 < last.prompt_eval_duration < last.total_duration

    prompt = "Say hello in one short sentence."
    parts = list(client.generate(model="tiny", prompt=prompt, stream=True, options=opts))
    assert all(p.prompt_eval_count is None for p in parts[:-1])  # the usage chunk is no line of its own
    assert [p.done for p in parts] == [False] * 6 + [True]
    said = engine.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0
    )
    not_streamed = client.generate(model="tiny", prompt=prompt, stream=False, options=opts)
    assert said.usage is not None
    assert parts[-1].prompt_eval_count == not_streamed.prompt_eval_count == said.usage.prompt_tokens > 0

    oa = openai.OpenAI(base_url=served.relay.url + "/r/ollama/v1", api_key=API_KEY, max_retries=0)
    messages: Any = HELLO
    chunks = list(
        oa.chat.completions.create(
            model="tiny",
            messages=messages,
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == truth.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 6


def test_a_validation_run_through_ollamas_api_reports_the_engines_prompt_counts(
    served: Served, tmp_path: Path
) -> None:
    """``bridge validate --api ollama`` on this route: the report's prompt tokens come from the
    engine's counters on each streamed answer, and its Ollama version row says that no Ollama ran."""
    out = tmp_path / "run"
    done = subprocess.run(
        bridge_cmd(
            "validate",
            *("--relay", served.relay.url, "--key", API_KEY, "--model", "tiny", "--route", "ollama"),
            *("--api", "ollama", "--case", "short-64", "--case", "long-64", "--repetitions", "1"),
            *("--concurrency", "1", "--out", str(out), "--bridge-log", str(served.metrics)),
        ),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=150,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads((out / "results.json").read_text())
    reqs = data["requests"]
    assert reqs and all(r["ok"] and r["prompt_tokens"] == r["prompt_eval_count"] > 0 for r in reqs)
    long = {r["prompt_tokens"] for r in reqs if r["case"] == "long-64"}
    assert min(long) > 10 * max(r["prompt_tokens"] for r in reqs if r["case"] == "short-64")
    report = (out / "report.md").read_text()
    row = next(ln for ln in report.splitlines() if ln.startswith("| 1 | long-64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[9].split()[0] == str(min(long))  # the prompt tokens column, filled
    assert f"| Ollama version | {OLLAMA_VERSION} (the API it follows: the bridge's Ollama API over" in report


def test_ollama_host_and_the_async_client_many_at_once(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", served.relay.url + "/r/ollama")
    prompts = [f"[request {i}] Say hello in one short sentence." for i in range(4)]
    opts = {"num_predict": 16, "temperature": 0}
    alone = [
        ollama.Client(headers=AUTH).generate(model="tiny", prompt=p, options=opts).response for p in prompts
    ]
    assert len(set(alone)) > 1

    async def together() -> list[str]:
        client = ollama.AsyncClient(headers=AUTH)

        async def one(prompt: str) -> str:
            text = ""
            async for part in await client.generate(model="tiny", prompt=prompt, stream=True, options=opts):
                text += part.response or ""
            return text

        return list(await asyncio.gather(*(one(p) for p in prompts)))

    assert asyncio.run(together()) == alone


# ---------------------------------------------------------------------------------- the other endpoints
def test_list_show_ps_version_as_the_clients_read_them(served: Served) -> None:
    client = served.client()
    (listed,) = client.list().models
    assert listed.model == "tiny:latest" and listed.modified_at is not None and len(listed.digest or "") == 64
    # The engine's /v1/models carries llama-server's `meta` (deployment/engine_server.py model_meta):
    # the file's size and the model's parameters, as Ollama lists them.
    assert served.engine.model_file is not None
    gguf = served.engine.model_file.stat().st_size
    assert listed.size is not None and 0 < listed.size <= gguf
    assert listed.details is not None and listed.details.format == "gguf" and listed.details.parameter_size
    shown = client.show("tiny")
    info = shown.modelinfo or {}
    assert (
        shown.capabilities == ["completion"]
        and info["general.parameter_count"] > 0
        and info["general.context_length"] > 0
        and "FROM tiny" in (shown.modelfile or "")
    )
    (loaded,) = client.ps().models
    assert loaded.model == "tiny:latest" and loaded.expires_at is not None
    with served.http() as h:
        r = h.get("/r/ollama/api/version")
        assert r.status_code == 200 and r.json() == {"version": OLLAMA_VERSION, "served_by": SERVED_BY}
        r = h.get("/r/ollama/")
        assert (r.status_code, r.text) == (200, "Ollama is running")
        head = h.head("/r/ollama/api/tags")
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 10
        assert h.get("/r/ollama/api/tags").headers["content-type"] == "application/json; charset=utf-8"
        r = h.post("/r/ollama/api/chat", json={"model": "tiny", "messages": []})  # loads the model
        assert r.json()["done_reason"] == "load" and r.json()["done"] is True
        r = h.post("/r/ollama/api/generate", json={"model": "tiny", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload"


def test_the_local_endpoint_serves_ollamas_api_too(served: Served) -> None:
    """Open WebUI and other programs next to the bridge: ``--listen``, route at /r/ollama and, as
    the first route, at the root."""
    for host in (served.local + "/r/ollama", served.local):
        reply = ollama.Client(host=host).chat(
            model="tiny", messages=HELLO, options={"num_predict": 5, "temperature": 0}
        )
        assert reply.eval_count == 5 and reply.message.content
    r = httpx.post(served.local + "/api/chat", content=b"{", timeout=10)
    assert r.status_code == 400 and "invalid JSON" in r.json()["error"]


# ---------------------------------------------------------------------------------- options
def test_options_reach_the_engine(served: Served) -> None:
    client = served.client()

    def run(n: int = 16, **options: Any) -> Any:
        return client.chat(model="tiny", messages=HELLO, options={"num_predict": n, **options})

    greedy = run(temperature=0).message.content
    assert run(temperature=0).message.content == greedy  # deterministic at temperature 0
    # seed: the same seed, the same sample; another seed, another one.
    hot = [run(temperature=1.5, seed=s).message.content for s in (7, 7, 8)]
    assert hot[0] == hot[1] != hot[2] and hot[0] != greedy
    assert run(temperature=1.5, top_k=1).message.content == greedy  # top_k 1 is greedy whatever the heat
    for n in (1, 7, 50):  # num_predict: exactly n tokens
        reply = run(n, temperature=0)
        assert reply.eval_count == n and reply.done_reason == "length"
        assert len(reply.message.content.split()) + reply.message.content.count(",") >= 1
    # stop: the answer ends before the stop text, done_reason "stop".
    pieces, _, _ = _chat_stream(client, 16)
    # The first piece from the fourth on whose text first shows up right there: the stop text.
    cut = next(
        i for i in range(3, 16) if "".join(pieces[: i + 1]).find(pieces[i]) == len("".join(pieces[:i]))
    )
    stopped = run(temperature=0, stop=[pieces[cut]])
    assert stopped.message.content == "".join(pieces[:cut]) and stopped.done_reason == "stop"
    # Options the engine fixed when it started are accepted and change nothing.
    assert run(temperature=0, num_ctx=512, num_gpu=0).message.content == greedy


def test_format_with_a_json_schema_gives_that_json(served: Served) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    reply = served.client().chat(
        model="tiny", messages=HELLO, format=schema, options={"num_predict": 64, "temperature": 0}
    )
    value = json.loads(reply.message.content or "")
    assert set(value) == {"a"} and isinstance(value["a"], int)


# ---------------------------------------------------------------------------------- bad input
def test_bad_input_gets_ollamas_errors(served: Served) -> None:
    client = served.client()
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="nope", messages=HELLO)
    assert (info.value.status_code, info.value.error) == (404, "model 'nope' not found")
    with pytest.raises(ollama.ResponseError) as info:
        list(client.generate(model="nope", prompt="hi", stream=True))
    assert info.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as info:
        client.chat(model="tiny", messages=HELLO, think=True)
    assert (info.value.status_code, info.value.error) == (400, '"tiny" does not support thinking')
    cases: list[tuple[str, str, Any, int, str]] = [
        ("POST", "/api/chat", {"model": "nope", "messages": HELLO}, 404, "model 'nope' not found"),
        ("POST", "/api/show", {"model": "nope"}, 404, "model 'nope' not found"),
        ("POST", "/api/embed", {"model": "nope", "input": "x"}, 404, "model 'nope' not found"),
        ("POST", "/api/chat", b'{"model": "tiny", "messages": [', 400, "invalid JSON in the request body"),
        ("POST", "/api/generate", b"", 400, "missing request body"),
        (
            "POST",
            "/api/chat",
            {"model": "tiny", "options": {"temperature": "hot"}},
            400,
            "must be of type float32",
        ),
        ("POST", "/api/chat", {"model": "tiny", "messages": "hi"}, 400, "cannot unmarshal string"),
        ("POST", "/api/pull", {"model": "tiny"}, 501, "is not available"),
    ]
    with served.http() as h:
        for method, path, body, status, message in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = h.request(method, "/r/ollama" + path, content=content)
            assert r.status_code == status, (path, r.status_code, r.text)
            assert r.headers["content-type"] == "application/json; charset=utf-8"
            assert list(r.json()) == ["error"] and message in r.json()["error"], (path, r.text)
        assert h.get("/r/ollama/api/chat").status_code == 405  # gin: method not allowed
        assert h.get("/r/ollama/api/nothing").text == "404 page not found"


def test_an_engine_without_embeddings_answers_ollamas_error(served: Served) -> None:
    with served.http() as h:
        r = h.post("/r/ollama/api/embed", json={"model": "tiny", "input": ["a", "b"]})
    assert r.status_code == 500 and "embedding=True" in r.json()["error"]
    assert served.engine.running  # and it still serves
    assert served.client().chat(model="tiny", messages=HELLO, options={"num_predict": 2}).eval_count == 2


def test_an_engine_that_cannot_be_reached_answers_ollamas_502(tmp_path: Path) -> None:
    relay = Relay(tmp_path / "relay")
    bridge = Bridge(relay, {"ollama": "openai+http://127.0.0.1:9"}, "--sample-interval", "0")
    try:
        with relay.client() as h:
            for method, path, body in (("GET", "/api/tags", None), ("POST", "/api/chat", {"model": "x"})):
                r = h.request(method, "/r/ollama" + path, json=body)
                assert r.status_code == 502 and list(r.json()) == ["error"], r.text
                assert r.json()["error"].startswith("the engine's models cannot be listed")
            assert h.get("/r/ollama/api/version").status_code == 200  # what needs no engine still answers
    finally:
        bridge.stop()
        relay.proc.stop()


def test_embed_on_an_engine_with_embeddings(tmp_path: Path) -> None:
    with _served(tmp_path, "--embedding", "true") as served:
        client = served.client()
        out = client.embed(model="tiny", input=["the sky is blue", "water"])
        assert len(out.embeddings) == 2 and out.embeddings[0] != out.embeddings[1]
        for vector in out.embeddings:
            assert len(vector) == 64 and math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-6)
        assert out.prompt_eval_count and out.total_duration
        cut = client.embed(model="tiny", input="water", dimensions=8).embeddings[0]
        assert len(cut) == 8 and math.isclose(math.fsum(v * v for v in cut), 1.0, rel_tol=1e-6)
        raw = client.embeddings(model="tiny", prompt="water").embedding  # the older API: not normalised
        assert len(raw) == 64 and not math.isclose(math.fsum(v * v for v in raw), 1.0, rel_tol=1e-3)
        norm = math.sqrt(math.fsum(v * v for v in raw))
        alone = client.embed(model="tiny", input="water").embeddings[0]
        assert [v / norm for v in raw] == pytest.approx(list(alone), rel=1e-5)
        assert client.embed(model="tiny", input=[]).embeddings == []


def test_an_engine_that_dies_mid_stream_ends_the_stream_with_an_error_line(tmp_path: Path) -> None:
    """As Ollama does when its runner dies: the lines so far, then ``{"error": ...}``, then the
    stream ends cleanly (the client reads an error, not a broken connection). A request while the
    engine is down gets Ollama's error shape with 502."""
    options = {"num_predict": 3000, "temperature": 0}
    body = {"model": "tiny", "messages": HELLO, "options": options}
    with _served(tmp_path) as served:
        engine, relay, bridge = served.engine, served.relay, served.bridge

        def kill() -> None:
            assert engine.proc is not None
            os.killpg(engine.proc.pid, signal.SIGKILL)

        # The ollama client: the lines, then ResponseError with the engine's failure.
        got = 0
        client = ollama.Client(host=relay.url + "/r/ollama", headers=AUTH)
        with pytest.raises(ollama.ResponseError, match="an error was encountered while running the model"):
            for part in client.chat(model="tiny", messages=HELLO, stream=True, options=options):
                assert not part.done
                got += 1
                if got == 20:
                    kill()
        assert 20 <= got < 3000
        with relay.client() as h:
            r = h.post("/r/ollama/api/chat", json={**body, "stream": False})
        assert r.status_code == 502 and list(r.json()) == ["error"], r.text

        # The same on the wire: NDJSON lines, the error line last, the body complete (no transport error).
        engine.stop()
        engine.start()
        lines: list[dict[str, Any]] = []
        with relay.client() as h, h.stream("POST", "/r/ollama/api/chat", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"] == "application/x-ndjson"
            for line in r.iter_lines():
                lines.append(json.loads(line))
                if len(lines) == 20:
                    kill()
        assert len(lines) > 20 and all(line["done"] is False for line in lines[:-1])
        assert list(lines[-1]) == ["error"], lines[-1]
        assert lines[-1]["error"].startswith("an error was encountered while running the model")
        until(lambda: "failed mid-response" in bridge.proc.output, 10, "the bridge's log line")


def test_the_main_command_serves_ollamas_api_at_r_ollama(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded deployment (what ``bash scripts/run.sh`` starts) has route ``ollama`` in front
    of its engine: ``OLLAMA_HOST=<relay>/r/ollama`` and ``base_url=<relay>/r/ollama/v1`` both work."""
    require_engine()
    state = tmp_path / "state"
    script = ROOT / "deployment" / "kaggle_ollama_webui.py"
    argv = [sys.executable, str(script), "--mode", "embedded", "--model-file", "tiny", "--webui", "off"]
    argv += ["--state-dir", str(state)]
    proc = Proc([*argv, "--drain-timeout", "5"], "deploy", env={"BRIDGE_NODE_TOKEN": NODE_TOKEN})
    try:
        m = proc.wait_for(r"READY in [\d.]+ s: open (http://127\.0\.0\.1:\d+/) \| key (bk_\S+) ", timeout=240)
        url, key = m.group(1), m.group(2)
        assert proc.wait_for(r"API: .*r/ollama/api/chat \(Ollama API\)").string
        monkeypatch.setenv("OLLAMA_HOST", url + "r/ollama")
        client = ollama.Client(headers={"Authorization": f"Bearer {key}"})
        assert [m.model for m in client.list().models] == ["tiny:latest"]
        pieces = [
            p.message.content
            for p in client.chat(
                model="tiny", messages=HELLO, stream=True, options={"num_predict": 8, "temperature": 0}
            )
            if not p.done
        ]
        assert len(pieces) == 8
        oa = openai.OpenAI(base_url=url + "r/ollama/v1", api_key=key, max_retries=0, timeout=30)
        answer = oa.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, temperature=0)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "".join(p or "" for p in pieces)
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.stop()
        _kill_children(state)


def _kill_children(state: Path) -> None:
    """The deployment's children run in sessions of their own: after a failed test, end them."""
    try:
        status = json.loads((state / "status.json").read_text())
    except (OSError, ValueError):
        return
    if status.get("state") in ("stopped", "failed"):  # its children were stopped
        return
    for child in status.get("children", {}).values():
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.killpg(child["pid"], signal.SIGKILL)
