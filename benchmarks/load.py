"""Load: a real relay, bridge and upstream on loopback driven by a bounded asyncio load generator
(``httpx.AsyncClient``, keep-alive), to find the highest request rate this machine sustains through
the tunnel and the latency percentiles at each step.

    .venv/bin/python benchmarks/load.py                        # default sweep, ~1 minute
    .venv/bin/python benchmarks/load.py --seconds 5 --concurrency 1,8,32

Each step runs ``--concurrency`` closed-loop clients for ``--seconds`` seconds (loopback only,
bounded in time and in clients) against ``GET /r/up/small`` (a 1 KB JSON answer), then one step of
streamed responses (NDJSON, 20 lines 5 ms apart) at the highest concurrency. The upstream is
the tests' one (``tests/upstreams.py``, the one stand-in of Ollama). The load generator runs on the
same 2 cores as the relay, bridge and upstream: the numbers are what the whole machine does, not
the relay alone. Prints a table and writes ``load.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.procs import API_KEY, Bridge, Relay, start_upstream  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def _cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def step(
    url: str, concurrency: int, seconds: float, kind: str, pids: dict[str, int] | None = None
) -> dict[str, Any]:
    """One closed-loop step; ``pids`` (name -> pid) get their CPU seconds per request reported."""
    pids = {"client": os.getpid(), **(pids or {})}
    cpu_before = {name: _cpu(pid) for name, pid in pids.items()}
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30, limits=limits
    ) as client:

        async def one() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                t = time.perf_counter()
                try:
                    if kind == "small":
                        r = await client.get("/r/up/small")
                        ok = r.status_code == 200
                    else:
                        lines = 0
                        async with client.stream(
                            "GET", "/r/up/stream", params={"n": 20, "interval": 0.005}
                        ) as r:
                            async for line in r.aiter_lines():
                                if line:
                                    lines += 1
                        ok = r.status_code == 200 and lines == 20
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t)
                else:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
    cpu = {name: _cpu(pid) - cpu_before[name] for name, pid in pids.items()}
    return {
        "cpu_ms_per_request": {
            name: round(1000 * used / max(1, len(latencies)), 3) for name, used in cpu.items()
        },
        "kind": kind,
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": errors,
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies, default=float("nan")) * 1000, 2),
    }


async def run(levels: list[int], seconds: float) -> list[dict[str, Any]]:
    upstream_proc, upstream = start_upstream()
    with tempfile.TemporaryDirectory(prefix="load-") as tmp:
        # One key, many clients: no per-key stream limit.
        relay = Relay(Path(tmp) / "relay", "--log-level", "info", "--key-streams", "0")
        bridge = Bridge(relay, {"up": upstream}, "--log-level", "warning")
        try:
            await step(relay.url, 4, 1.0, "small")  # warm-up: connections, code paths
            pids = {
                "relay": relay.proc.popen.pid,
                "bridge": bridge.proc.popen.pid,
                "upstream": upstream_proc.popen.pid,
            }
            results = []
            for level in levels:
                results.append(await step(relay.url, level, seconds, "small", pids))
                print(json.dumps(results[-1]), flush=True)
            results.append(await step(relay.url, max(levels), seconds, "stream", pids))
            print(json.dumps(results[-1]), flush=True)
            return results
        finally:
            bridge.stop()
            relay.proc.stop()
            upstream_proc.stop()


def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| request | clients | req/s | p50 ms | p99 ms | errors "
        "| CPU ms/request: client, relay, bridge, upstream |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        what = "GET 1 KB" if r["kind"] == "small" else "stream 20 lines"
        rows.append(
            f"| {what} | {r['concurrency']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} "
            f"| {r['errors']} | {', '.join(f'{v:.2f}' for v in r['cpu_ms_per_request'].values())} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds per step")
    ap.add_argument("--concurrency", default="1,4,16,64", help="comma-separated client counts")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    results = asyncio.run(run(levels, args.seconds))
    best = max((r for r in results if r["kind"] == "small" and r["errors"] == 0), key=lambda r: r["rps"])
    print(table(results))
    print(
        f"highest sustained: {best['rps']:.0f} req/s at {best['concurrency']} clients, "
        f"p99 {best['p99_ms']:.1f} ms, no errors"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "load.json").write_text(json.dumps({"results": results, "best": best}, indent=1))


if __name__ == "__main__":
    main()
