"""Busy is not dead (issue 21), and a real model by default (issue 17): the supervisor and the
embedded engine on real llama.cpp processes.

- A long prefill on the stock ``llama_cpp.server``, whose every model endpoint (``GET /v1/models``
  included) waits for the running request: its health check goes unanswered, yet the supervisor,
  seeing the engine's CPU at work, keeps it and says it is busy (before this, three unanswered
  checks restarted it in the middle of the request).
- A SIGSTOPped engine: restarted, and the log says it was hung (stopped, no progress).
- The embedded engine (deployment/engine_server.py) on Gemma 3 270M: ``/health`` and ``/v1/models``
  answer at once during a long prefill; a full queue answers 503 + ``Retry-After``; answers are words.
- The deployment's default model is Gemma where it is installed, its terms shown with its name.

The real-model tests need scripts/setup.d/30-llama-cpp.sh and 35-gemma.sh; they fail, never skip,
when either is missing (deselect with ``-m "not gemma"``). The Gate's decisions are also checked on
their own, with an injected clock and CPU reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from deployment.engine import (
    GEMMA_CHAT_FORMAT,
    GEMMA_MODEL_ID,
    GEMMA_TERMS_URL,
    EmbeddedEngine,
    engine_available,
    gemma_available,
    gemma_model_file,
    make_tiny_model,
)
from deployment.engine_llama import count_tokens
from deployment.engine_server import DIALOGUE_STOP, Gate, format_dialogue
from deployment.supervisor import ChildSpec, Supervisor

from .procs import ROOT, Proc, free_port

SCRIPT = ROOT / "deployment" / "kaggle_ollama_webui.py"
SUITE = json.loads((ROOT / "bridge" / "validate" / "prompts" / "v1.json").read_text())
NODE_TOKEN = "nt_test_" + "n" * 40
#: About 1,000 tokens of the validation suite's paragraph: many seconds of prefill on one CPU thread.
LONG = SUITE["paragraph"] * 10 + "Summarise the text above in one sentence."


def require_gemma() -> Path:
    why = engine_available() or gemma_available()
    if why:
        pytest.fail(f"{why}; or deselect these tests with -m 'not gemma'")
    return gemma_model_file(ROOT / ".cache" / "models")


@pytest.fixture(scope="module")
def gemma_file() -> Path:
    return require_gemma()


def _engine_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture
async def supervisor() -> AsyncIterator[tuple[Supervisor, list[str]]]:
    """A supervisor checking every 0.3 s, restarting after 3 bad checks; what it said."""
    said: list[str] = []
    sup = Supervisor(said.append, interval=0.3, bad_checks=3, backoff_initial=0.2)
    try:
        yield sup, said
    finally:
        sup.request_stop()
        for child in sup.children:  # a stopped process must be woken to act on SIGTERM
            if child.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGCONT)
        await sup.stop()


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.05)  # polling state another task changes; no event to wait on


# ----------------------------------------------------------------------------- the dialogue format
def test_dialogue_format_is_a_transcript_that_stops_at_the_next_user_turn() -> None:
    prompt, stop = format_dialogue(
        [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "Italy?"}],
            },
        ]
    )
    lines = prompt.split("\n")
    assert lines[0] == "You answer in French." and lines[1] == ""
    assert lines[-4:] == ["User: Hello", "Assistant: Bonjour", "User: Capital of Italy?", "Assistant:"]
    assert stop == DIALOGUE_STOP == ["\nUser:"]
    default, _ = format_dialogue([{"role": "user", "content": "Hi"}])
    assert default.startswith("A conversation between a user and a helpful assistant.\n\nUser: ")
    assert "User: What colour is grass?\nAssistant: Grass is green." in default  # an example
    # A long document in the turn: no examples (the model would copy their answers).
    long, _ = format_dialogue([{"role": "user", "content": LONG}])
    assert "grass" not in long and long.endswith(f"User: {LONG}\nAssistant:")


# ----------------------------------------------------------------------------- the gate, alone
async def test_gate_adds_the_usage_chunk_a_stream_asks_for() -> None:
    """``stream_options.include_usage``: the Gate counts what the model's ``generate`` saw (a
    stand-in for ``llama_cpp.Llama`` here; the real one in tests/test_engine.py), run in a worker
    thread as llama-cpp-python's server runs it, and adds the usage chunk before ``[DONE]``; a
    stream that did not ask, and an answer not streamed, are passed on untouched."""
    import anyio.to_thread

    class Model:
        def generate(self, tokens: list[int]) -> Iterator[int]:
            yield from (7, 8, 9, 0)  # 0: end of generation, not a completion token

    model = Model()
    count_tokens(model, is_end=lambda token: token == 0)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        prompt = list(range(len(body["prompt"])))
        tokens = await anyio.to_thread.run_sync(lambda: list(model.generate(prompt)))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        if not body.get("stream"):
            await send({"type": "http.response.body", "body": json.dumps({"tokens": tokens}).encode()})
            return
        for _ in tokens:
            event = {
                "id": "c1",
                "object": "text_completion",
                "created": 5,
                "model": "m",
                "choices": [{"text": "x"}],
            }
            raw = b"data: " + json.dumps(event).encode() + b"\n\n"
            await send({"type": "http.response.body", "body": raw, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    gate = Gate(app, models=["m"], model_busy=lambda: False, cpu=lambda: None)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://engine")
    ask = {"model": "m", "prompt": "abcde", "stream": True}
    usage_please = {"stream_options": {"include_usage": True}}
    events = (await client.post("/v1/completions", json={**ask, **usage_please})).text
    *chunks, usage, done = [e for e in events.split("\n\n") if e]
    assert len(chunks) == 4 and done == "data: [DONE]"
    last = json.loads(usage[len("data: ") :])
    assert last["choices"] == [] and (last["id"], last["object"], last["created"], last["model"]) == (
        "c1",
        "text_completion",
        5,
        "m",
    )
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert last["timings"]["predicted_n"] == 3 and last["timings"]["prompt_ms"] >= 0
    plain = (await client.post("/v1/completions", json=ask)).text
    assert "usage" not in plain and plain.endswith("data: [DONE]\n\n")
    whole = await client.post("/v1/completions", json={**ask, **usage_please, "stream": False})
    assert whole.json() == {"tokens": [7, 8, 9, 0]}


async def test_gate_queue_bound_health_and_hang_decisions() -> None:
    """The Gate around an app that holds each request until released: busy while the inference
    threads use CPU, hung (503) after ``hang_after`` without it, a full queue refused at once."""
    now = [1000.0]
    cpu = [5.0]
    release = asyncio.Event()
    holding = [0]

    async def model_app(scope: Any, receive: Any, send: Any) -> None:
        holding[0] += 1
        await release.wait()
        holding[0] -= 1
        now[0] += 4.0  # each request takes 4 s of the injected clock
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    gate = Gate(
        model_app,
        models=["m"],
        model_busy=lambda: holding[0] > 0,
        cpu=lambda: cpu[0],
        max_queue=3,
        hang_after=60,
        clock=lambda: now[0],
    )
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=gate), base_url="http://engine")

    async def health() -> tuple[int, dict[str, Any]]:
        r = await client.get("/health")
        return r.status_code, r.json()

    code, body = await health()
    assert code == 200 and body["status"] == "ok" and body["running"] == 0
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    running = [asyncio.create_task(client.post("/v1/chat/completions", json=chat)) for _ in range(3)]
    await _until(lambda: gate.admitted == 3, 5, "three requests admitted")
    code, body = await health()
    assert code == 200 and body["status"] == "busy" and body["waiting"] >= 2
    assert (await client.get("/v1/models")).json()["data"][0]["id"] == "m"  # not queued

    full = await client.post("/v1/chat/completions", json=chat)
    assert full.status_code == 503 and full.headers["retry-after"] == "5"  # no finished request yet
    assert full.json()["error"]["code"] == "engine_queue_full"

    now[0] += 100  # a long prefill: the inference threads keep using CPU
    cpu[0] += 90
    code, body = await health()
    assert code == 200 and body["status"] == "busy"
    now[0] += 61  # no CPU at all for longer than hang_after: hung
    code, body = await health()
    assert code == 503 and body["status"] == "hung" and "no inference progress" in body["detail"]
    cpu[0] += 0.01  # one tick of CPU is progress again
    assert (await health())[0] == 200

    release.set()
    done = await asyncio.gather(*running)
    assert [r.status_code for r in done] == [200, 200, 200]
    code, body = await health()
    assert code == 200 and body["status"] == "ok" and body["served"] == 3 and body["refused"] == 1
    assert 1 <= gate.retry_after() <= 200
    await client.aclose()


# ----------------------------------------------------------------------------- busy, not dead
@pytest.mark.engine
@pytest.mark.gemma
@pytest.mark.timeout(600)
async def test_a_long_prefill_is_busy_not_hung(
    gemma_file: Path, supervisor: tuple[Supervisor, list[str]], tmp_path: Path
) -> None:
    """The stock server answers ``GET /v1/models`` only between two generations: under a long
    prefill the supervisor's probe goes unanswered for many seconds, and it must keep the engine."""
    sup, said = supervisor
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        *("--model", str(gemma_file), "--model_alias", "gemma", "--host", "127.0.0.1", "--port", str(port)),
        *("--n_ctx", "2048", "--n_threads", "1", "--n_threads_batch", "1", "--interrupt_requests", "False"),
    ]
    child = await sup.add(
        ChildSpec(
            "engine",
            argv,
            _engine_env(),
            tmp_path / "engine.log",
            health_url=url + "/v1/models",
            health_timeout=1.0,
            ready_timeout=120,
        )
    )
    pid = child.pid
    watch = asyncio.create_task(sup.watch())
    try:
        async with httpx.AsyncClient(timeout=600, trust_env=False) as client:
            r = await client.post(
                url + "/v1/completions", json={"prompt": LONG, "max_tokens": 8, "temperature": 0}
            )
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] > 900
        # The probe did go unanswered (the case under test happened), and the supervisor said why
        # it kept the engine; then the engine answered its probe again.
        assert any("supervisor: engine is busy: its health check got no answer in 1 s" in s for s in said), (
            said
        )
        await _until(lambda: child.state == "healthy", 30, "the engine to answer its probe again")
        assert any("engine answers its health check again" in s for s in said), said
        assert child.pid == pid and child.restarts == 0 and child.starts == 1
        assert not any("restarting in" in s for s in said), said
    finally:
        sup.request_stop()
        await watch


@pytest.mark.engine
@pytest.mark.timeout(120)
async def test_a_stopped_engine_is_restarted_as_hung(
    supervisor: tuple[Supervisor, list[str]], tmp_path: Path
) -> None:
    """SIGSTOP: no answer, no CPU, state T. Three checks later it is killed and started again, and
    the log says it was hung and stopped, not merely slow."""
    if why := engine_available():
        pytest.fail(f"{why}; or deselect these tests with -m 'not engine'")
    sup, said = supervisor
    engine = EmbeddedEngine(make_tiny_model(tmp_path / "tiny.gguf"), port=free_port())
    child = await sup.add(
        ChildSpec(
            "engine",
            engine.command(),
            _engine_env(),
            tmp_path / "engine.log",
            health_url=engine.health_url,
            health_timeout=1.0,
            ready_timeout=60,
        )
    )
    old = child.pid
    assert old is not None
    watch = asyncio.create_task(sup.watch())
    try:
        os.killpg(old, signal.SIGSTOP)
        await _until(lambda: any("engine is back" in s for s in said), 60, "the engine's restart")
        restart = next(s for s in said if "restarting in" in s)
        assert "supervisor: engine hung: failed 3 health checks in a row" in restart, said
        assert "stopped (state T" in restart and str(old) in restart
        assert not any("is busy" in s for s in said), said  # a stopped process is never "busy"
        assert child.pid != old and child.restarts == 1 and child.state == "healthy"
        with pytest.raises(ProcessLookupError):
            os.kill(old, 0)
        async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
            r = await client.post(
                engine.openai_url + "/chat/completions",
                json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        sup.request_stop()
        await watch


# ----------------------------------------------------------------------------- the engine on Gemma
@pytest.fixture(scope="module")
def gemma_engine(gemma_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEngine]:
    log = tmp_path_factory.mktemp("gemma") / "engine.log"
    with EmbeddedEngine(
        gemma_file, model_id=GEMMA_MODEL_ID, chat_format=GEMMA_CHAT_FORMAT, max_queue=3, log_path=log
    ) as engine:
        yield engine


@pytest.mark.engine
@pytest.mark.gemma
@pytest.mark.timeout(600)
async def test_engine_answers_health_during_a_prefill_and_bounds_its_queue(
    gemma_engine: EmbeddedEngine,
) -> None:
    engine = gemma_engine
    async with httpx.AsyncClient(base_url=engine.openai_url, timeout=600, trust_env=False) as client:

        def chat(content: str, n: int) -> Any:
            body = {
                "model": GEMMA_MODEL_ID,
                "messages": [{"role": "user", "content": content}],
                "max_tokens": n,
                "temperature": 0,
            }
            return asyncio.create_task(client.post("/chat/completions", json=body))

        async def health() -> dict[str, Any]:
            started = time.monotonic()
            r = await client.get(engine.health_url, timeout=3)
            assert r.status_code == 200 and time.monotonic() - started < 3
            data: dict[str, Any] = r.json()
            return data

        long = chat(LONG, 8)
        deadline = time.monotonic() + 60
        while (await health())["running"] != 1:
            assert time.monotonic() < deadline, "the long request never started"
            await asyncio.sleep(0.05)
        questions = [chat("What is the capital of France?", 16), chat("What is 2 + 3?", 16)]
        while (await health())["waiting"] != 2:
            assert time.monotonic() < deadline and not long.done(), "the short requests never queued"
            await asyncio.sleep(0.05)
        # The queue is full (3): the next request is refused at once, with when to come back.
        started = time.monotonic()
        refused = await client.post("/chat/completions", json={"model": GEMMA_MODEL_ID, "messages": []})
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
        assert "busy" in refused.json()["error"]["message"] and time.monotonic() - started < 3
        # While the model works: health says busy, the model list answers, neither waits.
        state = await health()
        assert state["status"] == "busy" and state["running"] == 1 and state["waiting"] == 2
        models = await client.get("/models", timeout=3)
        assert [m["id"] for m in models.json()["data"]] == [GEMMA_MODEL_ID]
        assert not long.done(), "the prefill ended before the checks: make LONG longer"

        done = [await long, *[await q for q in questions]]
    assert [r.status_code for r in done] == [200, 200, 200]
    answers = [r.json()["choices"][0]["message"]["content"] for r in done[1:]]
    # A base model with the dialogue format: a short answer in words, not the question repeated.
    assert "paris" in answers[0].lower() and "5" in answers[1], answers
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in done)


@pytest.mark.engine
@pytest.mark.gemma
@pytest.mark.timeout(300)
def test_the_deployment_serves_gemma_by_default_and_names_its_terms(gemma_file: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = Proc(
        [
            sys.executable,
            str(SCRIPT),
            *("--mode", "embedded", "--webui", "off", "--state-dir", str(state)),
            *("--cache-dir", str(gemma_file.parent.parent), "--health-interval", "1", "--drain-timeout", "5"),
        ],
        "deploy",
        env={"BRIDGE_NODE_TOKEN": NODE_TOKEN},
    )
    try:
        m = proc.wait_for(r"READY in [\d.]+ s: open (http://127\.0\.0\.1:\d+/) \| key (bk_\S+) ", timeout=240)
        url, key = m.group(1), m.group(2)
        assert f"| model {GEMMA_MODEL_ID} |" in proc.output
        assert "chat format dialogue" in proc.output and GEMMA_TERMS_URL in proc.output
        client = openai.OpenAI(base_url=url + "r/engine/v1", api_key=key, max_retries=0, timeout=120)
        assert [x.id for x in client.models.list().data] == [GEMMA_MODEL_ID]
        answer = client.chat.completions.create(
            model=GEMMA_MODEL_ID,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "paris" in (answer.choices[0].message.content or "").lower()
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        proc.stop()
    status = json.loads((state / "status.json").read_text())
    assert status["model"] == GEMMA_MODEL_ID and status["state"] == "stopped"
