"""Per-request metering in the bridge (bridge/node/metering.py), GPU/host sampling (bridge/node/sampler.py),
the JSONL log and the STATS frames that carry both to the relay's /_relay/metrics.

The parsers are checked on byte streams cut at every position (the bridge sees whatever chunks the
upstream's writes make); the whole path with real processes: the stand-in Ollama, a real bridge and
relay, and the real ``ollama`` and ``openai`` clients."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import ollama
import openai
import pytest

from bridge.node.metering import LOG_NAME, MetricsLog, RequestMeter, read_log
from bridge.node.sampler import Sampler

from .conftest import _assert_no_secret_logged
from .procs import API_KEY, Bridge, Relay, until
from .test_stats import _metric
from .upstreams import REPLY

OLLAMA_LINES = [
    {"model": "m:1", "message": {"role": "assistant", "content": "Hel"}, "done": False},
    {"model": "m:1", "message": {"role": "assistant", "content": "lo"}, "done": False},
    {"model": "m:1", "message": {"role": "assistant", "content": "", "thinking": "hm"}, "done": False},
    {"model": "m:1", "message": {"role": "assistant", "content": " world"}, "done": False},
    {
        "model": "m:1",
        "message": {"role": "assistant", "content": ""},
        "done": True,
        "eval_count": 4,
        "eval_duration": 200_000_000,
        "prompt_eval_count": 30,
        "prompt_eval_duration": 15_000_000,
        "load_duration": 5_000_000,
        "total_duration": 300_000_000,
    },
]


def _feed(meter: RequestMeter, data: bytes, cut: int) -> None:
    meter.chunk(data[:cut])
    meter.chunk(data[cut:])


def test_ndjson_meter_reads_ollama_counters_whatever_the_chunking() -> None:
    data = b"".join(json.dumps(line).encode() + b"\n" for line in OLLAMA_LINES)
    for cut in range(len(data) + 1):
        meter = RequestMeter(route="ollama", method="POST", target="/api/chat", via="tunnel")
        meter.sent("http://127.0.0.1:11434")
        meter.response(200, [("Content-Type", "application/x-ndjson")])
        _feed(meter, data, cut)
        rec = meter.finish()
        assert rec["model"] == "m:1"
        assert rec["completion_tokens"] == 4
        assert rec["prompt_tokens"] == 30
        assert rec["tokens_per_s"] == 20.0  # 4 tokens in 0.2 s, Ollama's own counters
        assert rec["prompt_tokens_per_s"] == 2000.0
        assert rec["load_s"] == 0.005 and rec["engine_total_s"] == 0.3
        assert rec["bytes_out"] == len(data)
        assert 0 <= rec["ttft_s"] <= rec["total_s"]
        assert meter.chunks == 4  # three content pieces and one thinking piece
        assert meter.generation


def test_sse_meter_counts_chunks_or_takes_usage() -> None:
    def event(delta: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
        obj: dict[str, Any] = {"model": "tiny", "choices": [{"index": 0, "delta": delta}]}
        if usage is not None:
            obj = {"model": "tiny", "choices": [], "usage": usage}
        return b"data: " + json.dumps(obj).encode() + b"\n\n"

    pieces = [event({"role": "assistant", "content": ""})] + [event({"content": f"t{i} "}) for i in range(5)]
    plain = b"".join(pieces) + b"data: [DONE]\n\n"
    for cut in range(0, len(plain) + 1, 7):
        meter = RequestMeter(route="ollama", method="POST", target="/v1/chat/completions", via="local")
        meter.response(200, [("content-type", "text/event-stream; charset=utf-8")])
        _feed(meter, plain, cut)
        rec = meter.finish()
        assert rec["completion_tokens"] == 5, cut  # counted from the chunks (the empty role chunk is none)
        assert "prompt_tokens" not in rec
    with_usage = (
        b"".join(pieces) + event({}, {"prompt_tokens": 12, "completion_tokens": 6}) + b"data: [DONE]\n\n"
    )
    meter = RequestMeter(route="ollama", method="POST", target="/v1/chat/completions", via="local")
    meter.response(200, [("content-type", "text/event-stream")])
    meter.chunk(with_usage)
    rec = meter.finish()
    assert (rec["completion_tokens"], rec["prompt_tokens"]) == (6, 12)  # usage wins over counting


def test_meter_leaves_unknown_and_compressed_bodies_alone() -> None:
    meter = RequestMeter(route="webui", method="GET", target="/app.js", via="tunnel")
    meter.response(200, [("content-type", "application/x-ndjson"), ("content-encoding", "gzip")])
    meter.chunk(b"\x1f\x8b" + b"\x00" * 100)
    rec = meter.finish()
    assert rec["bytes_out"] == 102 and "completion_tokens" not in rec and not meter.generation


def test_jsonl_log_appends_whole_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    for i in range(3):
        log.write({"kind": "request", "i": i})
    log.close()
    (tmp_path / LOG_NAME).open("ab").write(b'{"kind": "requ')  # a torn last line (a crash mid-write)
    again = MetricsLog(tmp_path)
    again.write({"kind": "sample"})
    again.close()
    records = read_log(tmp_path / LOG_NAME)
    assert [r.get("i") for r in records if r["kind"] == "request"] == [0, 1, 2]


def test_sampler_on_this_machine(caplog: pytest.LogCaptureFixture) -> None:
    """NVML for real: on a GPU machine every GPU reports memory; without one the sampler says so
    once and still samples the host."""
    with caplog.at_level(logging.INFO, logger="bridge.sampler"):
        sampler = Sampler()
        first, second = sampler.sample(), sampler.sample()
        facts = sampler.facts()
        sampler.close()
    for sample in (first, second):
        assert sample["kind"] == "sample"
        assert 0 < sample["ram_used_bytes"] < sample["ram_total_bytes"]
        assert 0 <= sample["cpu_percent"] <= 100
    if sampler.no_gpu_reason:
        assert first["gpus"] == [] and facts["gpus"] == []
        said = [r for r in caplog.records if "no GPU" in r.getMessage()]
        assert len(said) == 1, "the sampler must say once that there is no GPU"
    else:
        assert facts["gpus"] and facts.get("driver")
        for gpu in first["gpus"]:
            assert 0 < gpu["memory_used_bytes"] <= gpu["memory_total_bytes"]


def test_bridge_meters_requests_into_log_and_relay_metrics(
    upstream: str,
    make_relay: Callable[..., Relay],
    make_bridge: Callable[..., Bridge],
    tmp_path: Path,
) -> None:
    relay = make_relay()
    metrics_dir = tmp_path / "metrics"
    bridge = make_bridge(
        relay, {"ollama": upstream}, "--metrics-dir", str(metrics_dir), "--sample-interval", "0.5"
    )
    log_path = metrics_dir / LOG_NAME
    client = ollama.Client(
        host=f"{relay.url}/r/ollama",
        headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": "ndjson-1"},
    )
    prompt = "count the words of this prompt please"
    parts = list(client.chat(model="tiny", messages=[{"role": "user", "content": prompt}], stream=True))
    final = parts[-1]
    assert final.done and final.eval_count == len(REPLY.split()) and final.eval_duration
    oai = openai.OpenAI(
        base_url=f"{relay.url}/r/ollama/v1", api_key=API_KEY, default_headers={"X-Request-Id": "sse-1"}
    )
    chunks = [
        c.choices[0].delta.content
        for c in oai.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        if c.choices and c.choices[0].delta.content
    ]

    def records() -> dict[str, dict[str, Any]]:
        if not log_path.exists():
            return {}
        return {r["request_id"]: r for r in read_log(log_path) if r.get("request_id")}

    until(lambda: {"ndjson-1", "sse-1"} <= set(records()), 30, "both requests in the JSONL log")
    rec = records()["ndjson-1"]
    assert rec["via"] == "tunnel" and rec["route"] == "ollama" and rec["status"] == 200
    assert rec["model"] == "tiny" and rec["path"] == "/api/chat"
    assert rec["completion_tokens"] == final.eval_count
    assert rec["prompt_tokens"] == final.prompt_eval_count == len(prompt.split())
    assert rec["tokens_per_s"] == pytest.approx(final.eval_count / (final.eval_duration / 1e9), abs=0.01)
    # The bridge's clock agrees with the engine's counters (the stand-in spaces tokens evenly).
    assert rec["tokens_per_s_bridge"] == pytest.approx(rec["tokens_per_s"], rel=0.5)
    assert 0 < rec["queue_s"] <= rec["ttft_s"] < rec["total_s"]
    assert rec["engine_total_s"] <= rec["total_s"]
    assert rec["bytes_in"] > 0 and rec["bytes_out"] > 0
    sse = records()["sse-1"]
    assert sse["completion_tokens"] == len(chunks) == len(REPLY.split())
    assert sse["path"] == "/v1/chat/completions" and "ttft_s" in sse

    bridge.proc.wait_for(r"INFO .*POST ollama/api/chat -> 200 model=tiny ttft=\d+ms tok/s=[\d.]+", 10)
    until(lambda: any(r["kind"] == "sample" for r in read_log(log_path)), 30, "a sample in the log")
    sample = next(r for r in read_log(log_path) if r["kind"] == "sample")
    assert sample["ram_total_bytes"] > 0 and isinstance(sample["gpus"], list)

    def scrape() -> str:
        r = httpx.get(
            relay.url + "/_relay/metrics", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10
        )
        r.raise_for_status()
        return r.text

    until(
        lambda: (
            (_metric(scrape(), "bridge_request_ttft_seconds_count", route="ollama", model="tiny") or 0) >= 2
        ),
        30,
        "the bridge's requests on /_relay/metrics",
    )
    until(lambda: _metric(scrape(), "bridge_host_memory_used_bytes") is not None, 30, "a host sample")
    text = scrape()
    assert (_metric(text, "bridge_completion_tokens_total", route="ollama", model="tiny") or 0) >= 2 * len(
        REPLY.split()
    )
    bridge.stop()
    relay.proc.stop()
    _assert_no_secret_logged(relay.proc, bridge.proc)
