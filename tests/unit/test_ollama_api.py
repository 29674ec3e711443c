"""Ollama's API on an OpenAI-only engine: the translation functions (bridge/ollama/api.py), bytes and
JSON in, bytes and JSON out. The expected shapes and messages are Ollama's own, read in its source
(api/types.go, server/routes.go, llm/llama_server.go at v0.33.0-rc2); the end-to-end tests with the
real engine and the real clients are in tests/test_ollama_engine.py."""

from __future__ import annotations

import base64
import itertools
import json
import math
from datetime import datetime
from typing import Any

import ollama
import pytest

from bridge.config import Route, parse_routes
from bridge.errors import ConfigError, RequestRefused
from bridge.ollama import api

MODELS = [api.EngineModel("tiny", created_ns=1_700_000_000_000_000_000)]
T0 = 1_000_000_000_000  # a monotonic time (ns) the request arrived at
WALL = 1_796_000_000_123_456_789


def refused(fn: Any, *args: Any) -> RequestRefused:
    with pytest.raises(RequestRefused) as info:
        fn(*args)
    return info.value


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        b"data: " + (e.encode() if isinstance(e, str) else json.dumps(e).encode()) + b"\n\n" for e in events
    )


def delta(content: str = "", finish: str | None = None, **extra: Any) -> dict[str, Any]:
    d: dict[str, Any] = {"content": content} if content else {}
    d.update(extra)
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish}]}


# ---------------------------------------------------------------------------------- routes
def test_route_syntax_marks_an_openai_only_upstream() -> None:
    assert Route.parse("ollama=openai+http://127.0.0.1:8001/") == Route(
        "ollama", "http://127.0.0.1:8001", "openai"
    )
    assert Route.parse("engine=http://127.0.0.1:8001").api == ""
    with pytest.raises(ConfigError, match="unknown API 'vllm'"):
        Route.parse("x=vllm+http://127.0.0.1:1")
    # Replicas inherit the API; a route cannot mix them.
    routes = parse_routes(["ollama=openai+http://127.0.0.1:1,http://127.0.0.1:2"])
    assert [(r.url, r.api) for r in routes] == [
        ("http://127.0.0.1:1", "openai"),
        ("http://127.0.0.1:2", "openai"),
    ]
    with pytest.raises(ConfigError, match="same API"):
        parse_routes(["ollama=openai+http://127.0.0.1:1", "ollama=http://127.0.0.1:2"])


# ---------------------------------------------------------------------------------- small values
def test_created_at_is_gos_rfc3339_and_the_python_client_reads_it() -> None:
    assert api.rfc3339(WALL) == "2026-11-30T00:53:20.123456789Z"
    assert api.rfc3339(1_796_000_000_120_000_000) == "2026-11-30T00:53:20.12Z"  # zeros trimmed
    assert api.rfc3339(1_796_000_000_000_000_000) == "2026-11-30T00:53:20Z"
    listed = ollama.ListResponse(**api.tags_answer(MODELS))
    assert isinstance(listed.models[0].modified_at, datetime)


def test_parameter_sizes_read_as_ollamas() -> None:
    assert [api.human_number(n) for n in (8_000_000_000, 8_190_000_000, 268_098_176, 7_000, 12)] == [
        "8B",
        "8.2B",
        "268.10M",
        "7K",
        "12",
    ]


@pytest.mark.parametrize(
    ("value", "ns"),
    [
        (None, None),
        (0, 0),
        ("0", 0),
        (300, 300_000_000_000),
        (1.5, 1_500_000_000),
        ("5m", 300_000_000_000),
        ("1h30m", 5_400_000_000_000),
        ("250ms", 250_000_000),
        (-1, api.FOREVER_NS),
        ("-1m", api.FOREVER_NS),
    ],
)
def test_keep_alive_reads_as_gos_duration(value: Any, ns: int | None) -> None:
    assert api.parse_keep_alive(value) == ns


@pytest.mark.parametrize("value", ["5", "abc", "5 m", "", True, [1]])
def test_a_bad_keep_alive_is_400(value: Any) -> None:
    assert refused(api.parse_keep_alive, value).status == 400


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "missing request body"),
        (b"  \n", "missing request body"),
        (b"{bad", "invalid JSON in the request body"),
        (b"[1, 2]", "cannot unmarshal array"),
        (b"\xff\xfe", "invalid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_400(raw: bytes, message: str) -> None:
    exc = refused(api.parse_body, raw)
    assert exc.status == 400 and message in exc.message


# ---------------------------------------------------------------------------------- models
def test_models_are_found_by_id_or_ollama_name() -> None:
    models = api.engine_models(
        {"data": [{"id": "tiny"}, {"id": "qwen3:8b"}, {"id": "org/Model-7B"}, {"nope": 1}, "x"]}, 5, {}
    )
    assert [m.name for m in models] == ["tiny:latest", "qwen3:8b", "org/Model-7B:latest"]
    assert api.find_model("tiny", models) is models[0]
    assert api.find_model("TINY:latest", models) is models[0]
    assert api.find_model("qwen3:8b", models) is models[1]
    assert api.find_model("qwen3", models) is None  # qwen3:latest is not qwen3:8b
    assert api.find_model("org/model-7b", models) is models[2]
    assert api.find_model("", models) is None


def test_first_seen_stands_for_a_creation_time_the_engine_does_not_give() -> None:
    seen: dict[str, int] = {}
    first = api.engine_models({"data": [{"id": "a"}, {"id": "b", "created": 1700000000}]}, 10, seen)
    again = api.engine_models({"data": [{"id": "a"}]}, 99, seen)
    assert first[0].created_ns == again[0].created_ns == 10
    assert first[1].created_ns == 1_700_000_000_000_000_000


def test_tags_ps_show_read_by_the_python_client() -> None:
    listing = {
        "data": [
            {"id": "gemma", "meta": {"n_params": 268_098_176, "size": 253_113_024, "n_ctx_train": 32768}}
        ]
    }
    models = api.engine_models(listing, WALL, {})
    tags = ollama.ListResponse(**api.tags_answer(models))
    (m,) = tags.models
    assert m.model == "gemma:latest" and m.size == 253_113_024 and len(m.digest or "") == 64
    assert m.details is not None and m.details.parameter_size == "268.10M"
    ps = ollama.ProcessResponse(**api.ps_answer(models, WALL))
    (p,) = ps.models
    assert p.context_length == 32768 and p.expires_at is not None and p.expires_at.year > 2200  # "Forever"
    show = ollama.ShowResponse(**api.show_answer({"model": "gemma"}, models))
    assert show.modelinfo == {"general.parameter_count": 268_098_176, "general.context_length": 32768}
    assert show.capabilities == ["completion"] and "FROM gemma" in (show.modelfile or "")
    assert api.show_answer({"name": "gemma:latest"}, models)["details"]["format"] == "gguf"  # older field


@pytest.mark.parametrize(
    ("req", "status", "message"),
    [
        ({}, 400, "model is required"),
        ({"model": ""}, 400, "model is required"),
        ({"model": "nope"}, 404, "model 'nope' not found"),
        ({"model": 3}, 400, "cannot unmarshal number"),
    ],
)
def test_show_refusals_are_ollamas(req: dict[str, Any], status: int, message: str) -> None:
    exc = refused(api.show_answer, req, MODELS)
    assert (exc.status, message in exc.message) == (status, True), exc.message


# ---------------------------------------------------------------------------------- requests
def test_chat_request_becomes_an_openai_chat_completion() -> None:
    gen = api.chat_request(
        {
            "model": "tiny:latest",
            "messages": [
                {"role": "System", "content": "Be brief."},
                {
                    "role": "user",
                    "content": "Hi",
                    "images": [base64.b64encode(b"\x89PNG\r\n\x1a\nxxxx").decode()],
                },
                {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1}}}],
                },
                {"role": "tool", "content": "2", "tool_name": "add"},
            ],
            "options": {
                "num_predict": 7,
                "temperature": 0,
                "seed": 42,
                "stop": ["\n"],
                "top_k": 5,
                "num_ctx": 99,
            },
            "format": "json",
            "think": False,
            "stream": False,
            "keep_alive": "10m",
        },
        MODELS,
    )
    assert (gen.kind, gen.model, gen.stream, gen.path, gen.answer) == (
        "chat",
        "tiny:latest",
        False,
        "/v1/chat/completions",
        "",
    )
    b = gen.body
    assert b["model"] == "tiny" and b["stream"] is True  # always streamed from the engine
    assert b["stream_options"] == {"include_usage": True}
    assert (b["max_tokens"], b["temperature"], b["seed"], b["stop"], b["top_k"]) == (7, 0.0, 42, ["\n"], 5)
    assert "num_ctx" not in b and "n_ctx" not in b  # fixed when the engine loaded the model
    assert b["response_format"] == {"type": "json_object"}
    assert b["chat_template_kwargs"] == {"enable_thinking": False}
    sysmsg, user, assistant, tool = b["messages"]
    assert sysmsg == {"role": "system", "content": "Be brief."}
    assert user["content"][0] == {"type": "text", "text": "Hi"}
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert assistant["tool_calls"] == [
        {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    ]
    assert tool == {"role": "tool", "name": "add", "content": "2"}


@pytest.mark.parametrize(
    ("options", "fields"),
    [
        ({"num_predict": -1}, {}),  # no limit: the engine's default
        ({"num_predict": -2}, {}),
        ({"num_predict": 3.9}, {"max_tokens": 3}),  # Go truncates a JSON number into an int
        ({"seed": -1}, {}),  # a random seed
        ({"temperature": 1}, {"temperature": 1.0}),
        ({"top_p": 0.5, "min_p": 0.1, "typical_p": 0.9}, {"top_p": 0.5, "min_p": 0.1, "typical_p": 0.9}),
        ({"repeat_penalty": 1.1, "repeat_last_n": 32}, {"repeat_penalty": 1.1, "repeat_last_n": 32}),
        (
            {"presence_penalty": 0.2, "frequency_penalty": 0.3},
            {"presence_penalty": 0.2, "frequency_penalty": 0.3},
        ),
        ({"num_keep": 4}, {"n_keep": 4}),
        ({"stop": []}, {}),
        ({"mirostat": 2, "tfs_z": 1, "unknown": "x", "use_mmap": True, "num_gpu": None}, {}),
    ],
)
def test_options_map_to_the_engines_fields(options: dict[str, Any], fields: dict[str, Any]) -> None:
    assert api.map_options(options) == fields


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": "hot"}, 'option "temperature" must be of type float32'),
        ({"num_predict": "5"}, 'option "num_predict" must be of type integer'),
        ({"num_predict": True}, 'option "num_predict" must be of type integer'),
        ({"stop": "x"}, 'option "stop" must be of type array'),
        ({"stop": [1]}, 'option "stop" must be of an array of strings'),
        ({"use_mmap": 1}, 'option "use_mmap" must be of type boolean'),
        ([1], "cannot unmarshal array"),
    ],
)
def test_an_option_of_the_wrong_kind_is_400(options: Any, message: str) -> None:
    exc = refused(api.map_options, options)
    assert exc.status == 400 and message in exc.message, exc.message


@pytest.mark.parametrize(
    ("req", "status", "message"),
    [
        ({"messages": []}, 400, "model is required"),
        ({"model": "nope", "messages": []}, 404, "model 'nope' not found"),
        ({"model": "tiny", "messages": [], "top_logprobs": 21}, 400, "top_logprobs must be between 0 and 20"),
        ({"model": "tiny", "think": True}, 400, '"tiny" does not support thinking'),
        ({"model": "tiny", "think": "high"}, 400, '"tiny" does not support thinking'),
        ({"model": "tiny", "think": "deep"}, 400, 'invalid think value: "deep"'),
        ({"model": "tiny", "think": 1}, 400, "think must be a boolean or string"),
        ({"model": "tiny", "format": "yaml"}, 400, "invalid format"),
        ({"model": "tiny", "messages": "hi"}, 400, "cannot unmarshal string"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, 400, "cannot unmarshal number"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x", "images": ["%%"]}]}, 400, "base64"),
        ({"model": "tiny", "stream": "yes"}, 400, "cannot unmarshal string"),
        ({"model": "tiny", "keep_alive": "soon"}, 400, 'time: invalid duration "soon"'),
    ],
)
def test_chat_refusals_are_ollamas(req: dict[str, Any], status: int, message: str) -> None:
    exc = refused(api.chat_request, req, MODELS)
    assert exc.status == status and message in exc.message, exc.message


def test_chat_without_messages_loads_or_unloads_as_ollama_answers() -> None:
    assert api.chat_request({"model": "tiny"}, MODELS).answer == "load"
    assert api.chat_request({"model": "tiny", "messages": [], "keep_alive": 0}, MODELS).answer == "unload"
    gen = api.generate_request({"model": "tiny", "prompt": "", "keep_alive": "0"}, MODELS)
    assert gen.answer == "unload"
    answer = api.immediate_answer(gen, WALL)
    assert answer == {
        "model": "tiny",
        "created_at": api.rfc3339(WALL),
        "response": "",
        "done": True,
        "done_reason": "unload",
    }
    assert api.immediate_answer(api.chat_request({"model": "tiny"}, MODELS), WALL)["message"] == {
        "role": "assistant",
        "content": "",
    }


def test_generate_uses_the_chat_template_unless_raw_or_suffix() -> None:
    gen = api.generate_request({"model": "tiny", "prompt": "Why?", "system": "Be brief."}, MODELS)
    assert gen.path == "/v1/chat/completions" and gen.stream is True
    assert gen.body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Why?"},
    ]
    raw = api.generate_request({"model": "tiny", "prompt": "Once", "raw": True}, MODELS)
    assert raw.path == "/v1/completions" and raw.body["prompt"] == "Once" and "messages" not in raw.body
    fim = api.generate_request({"model": "tiny", "prompt": "def f(", "suffix": "):"}, MODELS)
    assert fim.path == "/v1/completions" and fim.body["suffix"] == "):"
    for req, status, message in (
        ({"prompt": "x"}, 404, "model '' not found"),
        ({"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ({"model": "tiny", "prompt": "x", "raw": True, "system": "s"}, 400, "raw mode does not support"),
        ({"model": "tiny", "prompt": "x", "template": "{{ .Prompt }}"}, 400, "template is not supported"),
        ({"model": "tiny", "prompt": "x", "think": True}, 400, "does not support thinking"),
    ):
        exc = refused(api.generate_request, req, MODELS)
        assert exc.status == status and message in exc.message, exc.message


def test_a_json_schema_format_takes_llama_cpps_form() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    gen = api.chat_request(
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "format": schema}, MODELS
    )
    assert gen.body["response_format"] == {"type": "json_object", "schema": schema}


# ---------------------------------------------------------------------------------- the answer
def translator(kind: str = "chat", stream: bool = True) -> api.StreamTranslator:
    build = api.chat_request if kind == "chat" else api.generate_request
    key = "messages" if kind == "chat" else "prompt"
    value: Any = [{"role": "user", "content": "x"}] if kind == "chat" else "x"
    tr = api.StreamTranslator(build({"model": "tiny", key: value, "stream": stream}, MODELS), T0)
    tr.sent_ns = T0 + 1_000
    return tr


def lines(data: bytes) -> list[dict[str, Any]]:
    assert data.endswith(b"\n") or not data
    return [json.loads(line) for line in data.splitlines()]


def test_one_ndjson_line_per_token_even_when_events_arrive_split_or_together() -> None:
    tr = translator()
    stream = sse(
        delta(role="assistant"), delta(" Hello"), delta(" world"), delta(","), delta(finish="length")
    )
    stream += b"data: [DONE]\n\n"
    out = b""
    # Split in awkward places: mid-event, mid-UTF-8 is not possible here (split on bytes of ASCII).
    cut = [0, 7, 60, 61, 200, len(stream)]
    for i, (a, b) in enumerate(itertools.pairwise(cut)):
        out += tr.feed(stream[a:b], T0 + 10_000_000 * (i + 1), WALL)
    got = lines(out)
    assert [g["message"]["content"] for g in got] == [" Hello", " world", ","]
    assert all(g == {**g, "model": "tiny", "done": False} for g in got)
    assert all(g["message"]["role"] == "assistant" and g["created_at"].endswith("Z") for g in got)
    assert tr.failure == ""
    final = tr.finish(T0 + 100_000_000, WALL)
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["message"] == {"role": "assistant", "content": ""}  # streamed: the text went before
    parsed = ollama.ChatResponse(**final)
    assert parsed.eval_count == 3 and parsed.total_duration == 100_000_000


def test_counters_from_the_bridges_clock_are_consistent() -> None:
    tr = translator()
    tr.feed(sse(delta("a")), T0 + 20_000_000, WALL)  # first token 20 ms after arrival
    tr.feed(sse(delta(" b")), T0 + 30_000_000, WALL)
    tr.feed(sse(delta(" c"), delta(finish="stop")), T0 + 50_000_000, WALL)
    final = tr.finish(T0 + 51_000_000, WALL)
    assert final["done_reason"] == "stop"
    assert final["load_duration"] == 1_000  # before the request went to the engine
    assert final["prompt_eval_duration"] == 20_000_000 - 1_000  # sent -> first token
    assert final["eval_count"] == 3 and final["eval_duration"] == 30_000_000  # first -> last token
    assert final["total_duration"] == 51_000_000
    assert "prompt_eval_count" not in final  # the engine did not say: left out, as Go's omitempty
    parts = final["load_duration"] + final["prompt_eval_duration"] + final["eval_duration"]
    assert parts <= final["total_duration"]


def test_counters_the_engine_reports_win() -> None:
    tr = translator()
    tr.feed(sse(delta("a"), delta(finish="stop")), T0 + 5_000_000, WALL)
    tr.feed(
        sse({"choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 1}}), T0 + 6_000_000, WALL
    )
    assert tr.finish(T0 + 7_000_000, WALL)["prompt_eval_count"] == 12
    # llama.cpp's server: timings, as Ollama's own runner reads them (prompt = cache_n + prompt_n).
    tr = translator()
    timings = {"cache_n": 3, "prompt_n": 9, "prompt_ms": 4.5, "predicted_n": 2, "predicted_ms": 20.25}
    tr.feed(sse(delta("a"), delta("b"), {**delta(finish="stop"), "timings": timings}), T0 + 9, WALL)
    final = tr.finish(T0 + 10, WALL)
    assert (final["prompt_eval_count"], final["prompt_eval_duration"]) == (12, 4_500_000)
    assert (final["eval_count"], final["eval_duration"]) == (2, 20_250_000)


def test_the_embedded_engines_usage_chunk_fills_the_prompt_counters() -> None:
    """The usage chunk deployment/engine_server.py adds (``choices: []``, ``usage``, ``timings``
    without ``prompt_n``): no line of its own; the prompt's count from ``usage``, its time from
    ``prompt_ms``."""
    tr = translator()
    out = tr.feed(sse(delta("a"), delta("b"), delta(finish="length")), T0 + 5_000_000, WALL)
    timings = {"prompt_ms": 2.5, "predicted_n": 2, "predicted_ms": 3.25}
    usage = {"prompt_tokens": 17, "completion_tokens": 2, "total_tokens": 19}
    out += tr.feed(
        sse({"id": "c", "choices": [], "usage": usage, "timings": timings}, "[DONE]"), T0 + 6, WALL
    )
    assert [json.loads(line)["message"]["content"] for line in out.splitlines()] == ["a", "b"]
    final = tr.finish(T0 + 7_000_000, WALL)
    assert (final["prompt_eval_count"], final["prompt_eval_duration"]) == (17, 2_500_000)
    assert (final["eval_count"], final["eval_duration"]) == (2, 3_250_000)


def test_not_streamed_gathers_the_whole_answer() -> None:
    tr = translator("generate", stream=False)
    assert tr.feed(sse(delta("Once"), delta(" upon"), delta(finish="length")), T0 + 5, WALL) == b""
    final = tr.finish(T0 + 6, WALL)
    assert final["response"] == "Once upon" and final["done"] is True and final["done_reason"] == "length"
    assert list(final)[:5] == ["model", "created_at", "response", "done", "done_reason"]
    assert ollama.GenerateResponse(**final).eval_count == 2


def test_generate_lines_and_raw_completions_events() -> None:
    tr = translator("generate")
    out = tr.feed(sse({"choices": [{"text": " upon", "finish_reason": None}]}), T0 + 5, WALL)
    assert lines(out) == [
        {"model": "tiny", "created_at": api.rfc3339(WALL), "response": " upon", "done": False}
    ]


def test_reasoning_comes_back_as_thinking() -> None:
    tr = translator()
    out = tr.feed(sse(delta(reasoning_content="hmm"), delta("yes"), delta(finish="stop")), T0 + 5, WALL)
    first, second = lines(out)
    assert first["message"] == {"role": "assistant", "content": "", "thinking": "hmm"}
    assert second["message"] == {"role": "assistant", "content": "yes"}
    tr = translator(stream=False)
    tr.feed(sse(delta(reasoning="r1"), delta("a"), delta(finish="stop")), T0 + 5, WALL)
    assert tr.finish(T0 + 6, WALL)["message"] == {"role": "assistant", "content": "a", "thinking": "r1"}


def test_streamed_tool_calls_are_gathered_into_the_last_line() -> None:
    tr = translator()
    tc0 = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":'}}
    tc1 = {"index": 0, "function": {"arguments": " 1}"}}
    tr.feed(sse(delta(tool_calls=[tc0]), delta(tool_calls=[tc1]), delta(finish="tool_calls")), T0 + 5, WALL)
    final = tr.finish(T0 + 6, WALL)
    assert final["done_reason"] == "stop"  # anything but "length" is "stop", as Ollama maps it
    assert final["message"]["tool_calls"] == [
        {"id": "call_1", "function": {"index": 0, "name": "add", "arguments": {"a": 1}}}
    ]
    assert ollama.ChatResponse(**final).message.tool_calls is not None


def test_an_answer_cut_short_or_an_error_event_is_a_failure() -> None:
    tr = translator()
    tr.feed(sse(delta("a")), T0 + 5, WALL)
    assert tr.failure == "the engine's answer ended before it was finished"
    tr = translator()
    tr.feed(sse(delta("a"), {"error": {"message": "context full", "type": "x"}}), T0 + 5, WALL)
    assert tr.failure == "context full"
    assert json.loads(api.failure_line(tr.failure)) == {"error": "context full"}
    assert api.failure_line("x").endswith(b"\n")


def test_comments_pings_and_junk_between_events_are_skipped() -> None:
    tr = translator()
    data = b": ping - 2026-01-01\r\n\r\nevent: message\r\ndata: not json\r\n\r\n" + sse(delta("a"))
    assert [g["message"]["content"] for g in lines(tr.feed(data, T0 + 5, WALL))] == ["a"]


def test_a_multibyte_token_survives_a_split_event() -> None:
    tr = translator()
    data = sse(delta(" café ☕"))
    out = tr.feed(data[:15], T0 + 5, WALL) + tr.feed(data[15:], T0 + 6, WALL)
    assert lines(out)[0]["message"]["content"] == " café ☕"


@pytest.mark.parametrize(
    ("status", "body", "want"),
    [
        (
            500,
            b'{"error": {"message": "Llama model must be created with embedding=True\\n\\n  File x"}}',
            (500, "Llama model must be created with embedding=True"),
        ),
        (422, b'{"detail": [{"msg": "field required"}, {"msg": "bad"}]}', (400, "field required; bad")),
        (400, b'{"error": "plain"}', (400, "plain")),
        (503, b"Service Unavailable", (503, "Service Unavailable")),
        (502, b"", (502, "the engine answered 502")),
    ],
)
def test_engine_refusals_become_ollamas_error_shape(status: int, body: bytes, want: tuple[int, str]) -> None:
    assert api.engine_error(status, body) == want


# ---------------------------------------------------------------------------------- embeddings
def test_embed_is_normalised_and_cut_to_dimensions_as_ollama_does() -> None:
    plan = api.embed_request({"model": "tiny", "input": ["a", "b"], "dimensions": 1}, MODELS)
    assert plan.body == {"model": "tiny", "input": ["a", "b"]}
    per_token = {"index": 0, "embedding": [[3.0, 0.0], [3.0, 8.0]]}
    engine: dict[str, Any] = {
        "data": [{"index": 1, "embedding": [0.0, 2.0]}, per_token],
        "usage": {"prompt_tokens": 4},
    }
    out = api.embed_answer(plan, engine, 9_000, 1_000)
    # index order; per-token vectors averaged ([3, 4]); unit length; cut to 1 dimension, unit again
    assert out == {
        "model": "tiny",
        "embeddings": [[1.0], [0.0]],
        "total_duration": 9_000,
        "load_duration": 1_000,
        "prompt_eval_count": 4,
    }
    full = api.embed_answer(
        api.embed_request({"model": "tiny", "input": "a"}, MODELS), {"data": [per_token]}, 1, 0
    )
    assert full["embeddings"][0] == pytest.approx([0.6, 0.8])
    assert math.isclose(sum(v * v for v in full["embeddings"][0]), 1.0)
    assert ollama.EmbedResponse(**out).embeddings[0] == [1.0]


def test_the_older_embeddings_api_returns_the_raw_vector() -> None:
    plan = api.embeddings_request({"model": "tiny", "prompt": "a"}, MODELS)
    assert api.embed_answer(plan, {"data": [{"embedding": [3.0, 4.0]}]}, 1, 0) == {"embedding": [3.0, 4.0]}
    empty = api.embeddings_request({"model": "tiny", "prompt": ""}, MODELS)
    assert empty.inputs == [] and api.empty_embed_answer(empty) == {"embedding": []}
    assert refused(api.embeddings_request, {"prompt": "a"}, MODELS).message == "model is required"


@pytest.mark.parametrize(
    ("req", "status", "message"),
    [
        ({"model": "tiny", "input": [1]}, 400, "invalid input type"),
        ({"model": "tiny", "input": 5}, 400, "invalid input type"),
        ({"model": "nope", "input": "a"}, 404, "model 'nope' not found"),
        ({"input": "a"}, 404, "model '' not found"),
    ],
)
def test_embed_refusals_are_ollamas(req: dict[str, Any], status: int, message: str) -> None:
    exc = refused(api.embed_request, req, MODELS)
    assert (exc.status, exc.message) == (status, message)


def test_an_embedding_with_nan_or_of_the_wrong_shape_is_an_error() -> None:
    plan = api.embed_request({"model": "tiny", "input": "a"}, MODELS)
    assert refused(api.embed_answer, plan, {"data": [{"embedding": [float("nan")]}]}, 1, 0).status == 500
    assert refused(api.embed_answer, plan, {"data": []}, 1, 0).status == 500
    assert refused(api.embed_answer, plan, {"data": [{"embedding": "x"}]}, 1, 0).status == 500


def test_an_engine_that_answers_one_json_instead_of_streaming() -> None:
    tr = translator()
    answer = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": " all at once"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3},
    }
    out = tr.feed_whole(json.dumps(answer).encode(), T0 + 5, WALL)
    assert [g["message"]["content"] for g in lines(out)] == [" all at once"]
    assert tr.failure == ""
    final = tr.finish(T0 + 6, WALL)
    assert (final["prompt_eval_count"], final["eval_count"], final["done_reason"]) == (9, 3, "stop")
    bad = translator()
    assert bad.feed_whole(b"{}", T0, WALL) == b"" and "not an OpenAI completion" in bad.failure
