"""``bridge validate``: a run through a real relay and bridge (in front of the stand-in Ollama),
with the real ``ollama`` client; the report's numbers must agree with the bridge's JSONL log,
request by request and in the medians the report prints. Then ``--compare``."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.node.metering import LOG_NAME, read_log
from bridge.validate.report import PLOTS

from .procs import API_KEY, ROOT, Bridge, Relay, bridge_cmd, start_upstream

PNG = b"\x89PNG\r\n\x1a\n"


def _shown(value: float, scale: float = 1.0, digits: int = 1) -> str:
    """How the report prints a median: results.json keeps it to 6 decimals (bridge/validate/stats.py
    ``spread``) and report.md formats that, so round the same way first, or a median that falls on a
    printing boundary shows one digit apart (CI, stop 24: '1098.5' against '1098.6')."""
    return f"{round(value, 6) * scale:.{digits}f}"


@pytest.fixture(scope="module")
def fast_upstream() -> Iterator[str]:
    """The stand-in with 5 ms between tokens: a 64-token answer takes about 0.3 s."""
    proc, url = start_upstream(token_delay=0.005)
    yield url
    proc.stop()


def _validate(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        bridge_cmd("validate", *args), capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def _run(relay: Relay, out: Path, metrics: Path, *extra: str) -> dict[str, Any]:
    done = _validate(
        "--relay",
        relay.url,
        "--key",
        API_KEY,
        "--model",
        "tiny",
        "--out",
        str(out),
        "--case",
        "short-64",
        "--case",
        "long-64",
        "--bridge-log",
        str(metrics),
        *extra,
    )
    assert done.returncode == 0, done.stderr
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    return data


def test_validation_run_agrees_with_the_bridge_log(
    fast_upstream: str, make_relay: Callable[..., Relay], make_bridge: Callable[..., Bridge], tmp_path: Path
) -> None:
    relay = make_relay()
    metrics = tmp_path / "metrics"
    make_bridge(
        relay,
        {"ollama": fast_upstream},
        "--metrics-dir",
        str(metrics),
        "--sample-interval",
        "0.5",
        "--gpu-mode",
        "replicas",
    )
    out = tmp_path / "run-a"
    data = _run(relay, out, metrics, "--repetitions", "2", "--concurrency", "1,2", "--seed", "7")

    # What was run: the suite, levels, seed and temperature, and the environment.
    assert data["suite"]["version"] == "v1" and data["suite"]["seed"] == 7
    assert data["suite"]["temperature"] == 0 and data["suite"]["concurrency"] == [1, 2]
    env = data["environment"]
    assert env["ollama_version"] == "0.20.0-standin" and env["model_digest"] == "0" * 64
    assert env["gpu_mode"] == "replicas" and env["project_version"]
    assert env["nodes"] and env["nodes"][0]["software"].startswith("kaggle-bridge/")
    reqs = data["requests"]
    assert len(reqs) == 2 * 2 * (1 + 2) and all(r["ok"] for r in reqs)
    assert len({r["request_id"] for r in reqs}) == len(reqs)
    assert all(r["completion_tokens"] == 64 for r in reqs)  # num_predict reached the engine
    long_prompts = {r["prompt_tokens"] for r in reqs if r["case"] == "long-64"}
    short_prompts = {r["prompt_tokens"] for r in reqs if r["case"] == "short-64"}
    assert min(long_prompts) > 10 * max(short_prompts)
    assert data["samples"], "no host/GPU samples polled from the relay during the run"

    # Request by request, the bridge's JSONL log agrees with what the client measured.
    log = {r["request_id"]: r for r in read_log(metrics / LOG_NAME) if r.get("request_id")}
    warmup = data["warmup"]["request_id"]
    assert warmup in log and warmup not in {r["request_id"] for r in reqs}  # warm-up made but not counted
    for rec in reqs:
        b = log[rec["request_id"]]
        assert b["completion_tokens"] == rec["eval_count"] == rec["bridge"]["completion_tokens"]
        assert b["prompt_tokens"] == rec["prompt_tokens"]
        assert b["tokens_per_s"] == pytest.approx(rec["tokens_per_s"], abs=0.01)  # Ollama's counters
        assert b["ttft_s"] <= rec["ttft_s"] and b["total_s"] <= rec["total_s"]  # the relay hop adds
        assert rec["tunnel_ttft_overhead_s"] == pytest.approx(rec["ttft_s"] - b["ttft_s"], abs=1e-5)

    # The report's medians are the JSONL's medians.
    report = (out / "report.md").read_text()
    for row in data["summary"]:
        ids = [
            r["request_id"]
            for r in reqs
            if r["concurrency"] == row["concurrency"] and r["case"] == row["case"]
        ]
        bridge_ttft = statistics.median(log[i]["ttft_s"] for i in ids)
        tps = statistics.median(log[i]["tokens_per_s"] for i in ids)
        assert row["bridge_ttft_s"]["median"] == pytest.approx(bridge_ttft, abs=1e-6)
        assert row["tokens_per_s"]["median"] == pytest.approx(tps, abs=0.01)
        line = next(
            ln for ln in report.splitlines() if ln.startswith(f"| {row['concurrency']} | {row['case']} |")
        )
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5].split()[0] == _shown(bridge_ttft, 1000, 0)
        assert cells[7].split()[0] == _shown(row["tokens_per_s"]["median"])
    assert f"{len(reqs)} of {len(reqs)} requests joined" in report
    for name in PLOTS:
        assert (out / name).read_bytes().startswith(PNG), name
        assert f"]({name})" in report

    # A second run, labelled otherwise, compared side by side.
    out_b = tmp_path / "run-b"
    _run(relay, out_b, metrics, "--repetitions", "1", "--concurrency", "1,2", "--gpu-mode", "split")
    cmp = _validate("--compare", str(out), str(out_b), "--out", str(tmp_path / "cmp"))
    assert cmp.returncode == 0, cmp.stderr
    assert "# replicas vs split" in cmp.stdout
    rows = [ln for ln in cmp.stdout.splitlines() if ln.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(ln.rstrip(" |").endswith("x") for ln in rows)
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(PNG)


def test_validate_reports_bad_usage_clearly(tmp_path: Path) -> None:
    base = ["--relay", "http://127.0.0.1:9", "--key", "k", "--out", str(tmp_path)]
    for extra, message in (
        ([], "missing --model"),
        (["--model", "m", "--suite", "v0"], "prompt suite 'v0'"),
        (["--model", "m", "--case", "nope"], "no case(s) ['nope']"),
        (["--model", "m", "--concurrency", "1,x"], "--concurrency '1,x'"),
    ):
        done = _validate(*base, *extra)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_relay_has_one_name_and_the_old_one_still_works(tmp_path: Path) -> None:
    """``--relay``/``BRIDGE_RELAY`` names the relay for ``bridge validate`` as for ``bridge connect``
    (a ws:// URL given for it works too); ``--relay-url``/``BRIDGE_RELAY_URL``, the old name, still
    works with a note."""
    base = ["--key", "k", "--out", str(tmp_path), "--model", "m", "--suite", "v0"]
    for args, env in (
        (["--relay", "ws://127.0.0.1:9"], {}),
        ([], {"BRIDGE_RELAY": "http://127.0.0.1:9"}),
        (["--relay-url", "http://127.0.0.1:9"], {}),
        ([], {"BRIDGE_RELAY_URL": "http://127.0.0.1:9"}),
    ):
        done = subprocess.run(
            bridge_cmd("validate", *args, *base),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
            env={k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")} | env,
        )
        # Past the relay check: the (missing) suite is what fails.
        assert done.returncode == 2 and "prompt suite 'v0'" in done.stderr, (args, env, done.stderr)
        deprecated = "--relay-url" in args or "BRIDGE_RELAY_URL" in env
        assert ("deprecated: use --relay or BRIDGE_RELAY" in done.stderr) == deprecated, done.stderr
    done = _validate(*base)
    assert done.returncode == 2 and "missing --relay" in done.stderr


def test_a_public_relay_address_stays_out_of_the_report() -> None:
    from bridge.validate.runner import _shown_url

    assert _shown_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    assert _shown_url("https://relay.example.com/base") == "https://(not shown)"
    assert _shown_url("https://user:pw@relay.example.com") == "https://(not shown)"
