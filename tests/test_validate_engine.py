"""Issue 5's validation run for real: ``bridge validate --api openai`` through a real relay and
bridge against the embedded llama.cpp engine (deployment/engine.py, the generated tiny model), as a
user would run it. The report's numbers (results.json and report.md) must agree with the bridge's
JSONL log: counts, TTFT and tokens/s medians, request by request and per row; the plots must be
real pictures. No GPU here: the NVML side is exercised through its no-GPU path (the bridge says so
once and samples CPU and RAM; the report says why there are no GPU numbers).

Fails, never skips, when llama-cpp-python is missing (scripts/setup.d/30-llama-cpp.sh); deselect
with ``-m "not engine"``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.node.metering import LOG_NAME, read_log
from bridge.validate.report import PLOTS
from deployment.engine import EmbeddedEngine, engine_available

from .procs import API_KEY, ROOT, Bridge, Relay, bridge_cmd

pytestmark = [pytest.mark.engine, pytest.mark.timeout(240)]

PNG = b"\x89PNG\r\n\x1a\n"
LEVELS = (1, 2, 4)
REPETITIONS = 2
CASES = ("short-64", "long-64")


def _shown(value: float, scale: float = 1.0, digits: int = 1) -> str:
    """How the report prints a median: results.json keeps it to 6 decimals (bridge/validate/stats.py
    ``spread``) and report.md formats that, so round the same way first, or a median that falls on a
    printing boundary shows one digit apart (CI, stop 24: '1098.5' against '1098.6')."""
    return f"{round(value, 6) * scale:.{digits}f}"


@pytest.fixture(scope="module")
def run(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """One validation run: (its folder, results.json, the bridge's JSONL records)."""
    why = engine_available()
    if why:
        pytest.fail(f"{why}; or deselect these tests with -m 'not engine'")
    base = tmp_path_factory.mktemp("validate-engine")
    metrics = base / "metrics"
    out = base / "run"
    with EmbeddedEngine(log_path=base / "engine.log") as engine:
        relay = Relay(base / "relay")
        bridge = None
        try:
            bridge = Bridge(
                relay,
                {"llm": engine.url},
                "--metrics-dir",
                str(metrics),
                "--sample-interval",
                "0.25",
                "--gpu-mode",
                "cpu",
            )
            done = subprocess.run(
                bridge_cmd(
                    "validate",
                    "--relay",
                    relay.url,
                    "--key",
                    API_KEY,
                    "--api",
                    "openai",
                    "--route",
                    "llm",
                    "--model",
                    engine.model,
                    "--out",
                    str(out),
                    *[a for case in CASES for a in ("--case", case)],
                    "--repetitions",
                    str(REPETITIONS),
                    "--concurrency",
                    ",".join(map(str, LEVELS)),
                    "--seed",
                    "11",
                    "--bridge-log",
                    str(metrics),
                ),
                capture_output=True,
                text=True,
                cwd=ROOT,
                timeout=180,
            )
        finally:
            if bridge is not None:
                bridge.stop()
            relay.proc.stop()
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"report: {out / 'report.md'}" in done.stdout
    data: dict[str, Any] = json.loads((out / "results.json").read_text())
    yield out, data, read_log(metrics / LOG_NAME)


def _row_cells(report: str, prefix: str, section: str = "## Results") -> list[str]:
    """The cells of the first row starting with ``prefix`` in the section headed ``section``."""
    lines = report.split(section, 1)[1].split("\n## ", 1)[0].splitlines()
    line = next(ln for ln in lines if ln.startswith(prefix))
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_the_run_is_what_was_asked_and_every_request_is_in_the_bridge_log(
    run: tuple[Path, dict[str, Any], list[dict[str, Any]]],
) -> None:
    _, data, records = run
    suite, env, reqs = data["suite"], data["environment"], data["requests"]
    assert suite["version"] == "v1" and suite["seed"] == 11 and suite["temperature"] == 0
    assert suite["concurrency"] == list(LEVELS) and suite["repetitions"] == REPETITIONS
    assert [c["id"] for c in suite["cases"]] == list(CASES)
    assert env["api"] == "openai" and env["route"] == "llm" and env["models"] == ["tiny"]
    assert env["gpu_mode"] == "cpu" and env["project_version"] and env["git_commit"]
    assert len(reqs) == REPETITIONS * len(CASES) * sum(LEVELS) and all(r["ok"] for r in reqs)

    # Counts: the log holds exactly this run's requests plus the warm-up, each answered 200, and
    # each generated the 64 tokens asked for (counted by the client and by the bridge alike).
    run_ids = {r["request_id"] for r in reqs}
    logged = {
        r["request_id"]: r
        for r in records
        if r.get("kind") == "request" and str(r.get("request_id", "")).startswith(data["run_id"])
    }
    assert set(logged) == run_ids | {data["warmup"]["request_id"]}
    assert len(run_ids) == len(reqs)
    assert all(r["status"] == 200 and r["route"] == "llm" for r in logged.values())
    for rec in reqs:
        b = logged[rec["request_id"]]
        assert rec["chunks"] == rec["completion_tokens"] == b["completion_tokens"] == 64
        assert rec["bridge"]["completion_tokens"] == 64
        assert b["ttft_s"] <= rec["ttft_s"] and b["total_s"] <= rec["total_s"]  # the relay hop adds
        assert rec["tunnel_ttft_overhead_s"] == pytest.approx(rec["ttft_s"] - b["ttft_s"], abs=1e-5)
        # No engine counters in an OpenAI stream: the decode rate is the bridge's, taken next to
        # the engine, not the client's.
        assert rec.get("tokens_per_s") == b.get("tokens_per_s")
        assert rec.get("tokens_per_s_source", "bridge") == "bridge"
    long_chars = {r["prompt_chars"] for r in reqs if r["case"] == "long-64"}
    short_chars = {r["prompt_chars"] for r in reqs if r["case"] == "short-64"}
    assert min(long_chars) > 20 * max(short_chars)
    # A long prompt costs the engine time before its first token: visible in the bridge's TTFT.
    by_case = {
        case: statistics.median(logged[r["request_id"]]["ttft_s"] for r in reqs if r["case"] == case)
        for case in CASES
    }
    assert by_case["long-64"] > by_case["short-64"]


def test_report_numbers_are_the_bridge_logs_numbers(
    run: tuple[Path, dict[str, Any], list[dict[str, Any]]],
) -> None:
    out, data, records = run
    reqs = data["requests"]
    log = {r["request_id"]: r for r in records if r.get("request_id")}
    report = (out / "report.md").read_text()
    assert len(data["summary"]) == len(LEVELS) * len(CASES)
    for row in data["summary"]:
        ids = [
            r["request_id"]
            for r in reqs
            if r["concurrency"] == row["concurrency"] and r["case"] == row["case"]
        ]
        assert row["requests"] == len(ids) == REPETITIONS * row["concurrency"] and row["errors"] == 0
        ttft = statistics.median(log[i]["ttft_s"] for i in ids)
        rates = [log[i]["tokens_per_s"] for i in ids if "tokens_per_s" in log[i]]
        assert rates, "the bridge timed no request of this row"
        assert row["bridge_ttft_s"]["median"] == pytest.approx(ttft, abs=1e-6)
        assert row["tokens_per_s"]["median"] == pytest.approx(statistics.median(rates), abs=1e-3)
        assert row["tokens_per_s"]["n"] == len(rates)
        assert row["completion_tokens"]["median"] == statistics.median(
            log[i]["completion_tokens"] for i in ids
        )
        cells = _row_cells(report, f"| {row['concurrency']} | {row['case']} |")
        assert cells[2] == str(len(ids)) and cells[3] == "0"
        assert cells[5].split()[0] == _shown(ttft, 1000, 0)
        assert cells[7].split()[0] == _shown(statistics.median(rates))
        assert cells[10] == "64 (64-64)"
    for level in LEVELS:  # the by-concurrency table, all cases together
        ids = [r["request_id"] for r in reqs if r["concurrency"] == level]
        rates = [log[i]["tokens_per_s"] for i in ids if "tokens_per_s" in log[i]]
        cells = _row_cells(report, f"| {level} | ", "## By concurrency")
        assert cells[2].split()[0] == _shown(statistics.median(rates))
    assert f"{len(reqs)} of {len(reqs)} requests joined" in report
    assert f"completion tokens agree for {len(reqs)}." in report
    assert "decode rates per request are from the bridge next to the engine" in report


def test_no_gpu_is_said_once_and_host_samples_are_plotted(
    run: tuple[Path, dict[str, Any], list[dict[str, Any]]],
) -> None:
    """The NVML path without a GPU (none is lent to this machine): the bridge reports why, samples
    CPU and RAM, and the report says why it shows no GPU memory."""
    out, data, records = run
    nodes = [r for r in records if r.get("kind") == "node"]
    assert len(nodes) == 1 and nodes[0]["gpus"] == [] and nodes[0]["no_gpu"]
    samples = [r for r in records if r.get("kind") == "sample"]
    assert len(samples) >= 2 and all(s["gpus"] == [] and s["ram_used_bytes"] > 0 for s in samples)
    assert data["samples"] and all("ram_used_bytes" in s for s in data["samples"])
    assert data["environment"]["nodes"][0]["no_gpu"] == nodes[0]["no_gpu"]
    report = (out / "report.md").read_text()
    assert f"No GPU samples ({nodes[0]['no_gpu']})." in report


def test_plots_are_real_pictures(run: tuple[Path, dict[str, Any], list[dict[str, Any]]]) -> None:
    from matplotlib import image

    out, _, _ = run
    report = (out / "report.md").read_text()
    pictures = []
    for name in PLOTS:
        path = out / name
        assert path.read_bytes().startswith(PNG), name
        assert f"![{name}]({name})" in report
        pixels = image.imread(path)
        height, width = pixels.shape[:2]
        assert width >= 600 and height >= 400, (name, width, height)
        ink = (pixels[:, :, :3].min(axis=2) < 0.9).mean()  # share of pixels that are not near white
        assert 0.02 < ink < 0.5, (name, ink)
        # Coloured marks (the data series), not only black axes and text.
        colour = (pixels[:, :, :3].max(axis=2) - pixels[:, :, :3].min(axis=2) > 0.3).mean()
        assert colour > 0.001, (name, colour)
        pictures.append(path.read_bytes())
    assert len(set(pictures)) == len(PLOTS)
