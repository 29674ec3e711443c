"""Soak: a real relay, bridge and upstream on loopback under steady mixed load for a long time
(default 10 minutes), sampling the resident memory (RSS) and open file descriptors of the relay and
the bridge. Memory must stay flat and no descriptor may leak.

    .venv/bin/python benchmarks/soak.py                    # 10 minutes, figure under benchmarks/figures/
    .venv/bin/python benchmarks/soak.py --minutes 1 --rate 50

The load is bounded (``--rate`` requests a second, at most ``--concurrency`` at once, loopback only):
a mix of small GETs, streamed NDJSON responses, uploads that stream back, and clients that give up
mid-stream (they must free their streams). It prints one line per sample and a summary, writes
``soak.json`` and ``soak.png`` to ``--out``, and exits 1 when memory grew by more than
``--max-growth-mib`` between the first and the last fifth of the run, or the descriptors grew.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
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


def _proc_sample(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of a process."""
    proc = psutil.Process(pid)
    return proc.memory_info().rss / 2**20, proc.num_fds()


async def _one(client: httpx.AsyncClient, kind: str, counts: dict[str, int]) -> None:
    try:
        if kind == "small":
            r = await client.get("/r/up/small")
            ok = r.status_code == 200 and r.json()["ok"] is True
        elif kind == "stream":
            lines = 0
            async with client.stream("GET", "/r/up/stream", params={"n": 20, "interval": 0.01}) as r:
                async for _ in r.aiter_lines():
                    lines += 1
            ok = r.status_code == 200 and lines == 20
        elif kind == "upload":
            body = random.randbytes(random.randint(1, 300_000))
            r = await client.post("/r/up/sha256", content=body)
            ok = r.status_code == 200 and r.json()["length"] == len(body)
        else:  # a client that gives up mid-stream
            async with client.stream("GET", "/r/up/stream", params={"n": 100, "interval": 0.01}) as r:
                async for _ in r.aiter_lines():
                    break
            ok = r.status_code == 200
    except httpx.HTTPError:
        ok = False
    counts["ok" if ok else "failed"] += 1


async def _load(url: str, rate: float, concurrency: int, stop: asyncio.Event, counts: dict[str, int]) -> None:
    sem = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    kinds = ["small"] * 6 + ["stream"] * 2 + ["upload", "abandon"]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30, limits=limits
    ) as client:
        next_at = time.monotonic()
        while not stop.is_set():
            await sem.acquire()

            async def run(kind: str) -> None:
                try:
                    await _one(client, kind, counts)
                finally:
                    sem.release()

            task = asyncio.create_task(run(random.choice(kinds)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await asyncio.gather(*tasks, return_exceptions=True)


async def soak(minutes: float, rate: float, concurrency: int, interval: float) -> dict[str, Any]:
    upstream_proc, upstream = start_upstream(token_delay=0.01)
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        relay = Relay(Path(tmp) / "relay", "--key-streams", "0")  # one key, --concurrency clients
        bridge = Bridge(relay, {"up": upstream}, "--log-level", "info")
        counts = {"ok": 0, "failed": 0}
        samples: list[dict[str, float]] = []
        stop = asyncio.Event()
        started = time.monotonic()
        loader = asyncio.create_task(_load(relay.url, rate, concurrency, stop, counts))
        try:
            while (elapsed := time.monotonic() - started) < minutes * 60:
                relay_rss, relay_fds = _proc_sample(relay.proc.popen.pid)
                bridge_rss, bridge_fds = _proc_sample(bridge.proc.popen.pid)
                sample = {
                    "t": round(elapsed, 1),
                    "relay_rss_mib": round(relay_rss, 2),
                    "relay_fds": relay_fds,
                    "bridge_rss_mib": round(bridge_rss, 2),
                    "bridge_fds": bridge_fds,
                    "ok": counts["ok"],
                    "failed": counts["failed"],
                }
                samples.append(sample)
                print(json.dumps(sample), flush=True)
                await asyncio.sleep(interval)
        finally:
            stop.set()
            await loader
            # Idle: every stream freed, descriptors back to the resting level once the bridge's
            # keep-alive connections to the upstream expired (httpx: 30 s).
            await asyncio.sleep(35)
            health = relay.health()
            idle = {
                "relay_fds": _proc_sample(relay.proc.popen.pid)[1],
                "bridge_fds": _proc_sample(bridge.proc.popen.pid)[1],
                "requests_in_flight": health["requests_in_flight"],
            }
            bridge.stop()
            relay.proc.stop()
            upstream_proc.stop()
    return {"samples": samples, "counts": counts, "idle": idle, "minutes": minutes, "rate": rate}


def summarize(result: dict[str, Any], max_growth_mib: float) -> tuple[dict[str, Any], bool]:
    samples = result["samples"]
    fifth = max(1, len(samples) // 5)
    out: dict[str, Any] = {
        "requests_ok": result["counts"]["ok"],
        "requests_failed": result["counts"]["failed"],
    }
    ok = result["counts"]["failed"] == 0 and result["idle"]["requests_in_flight"] == 0
    for side in ("relay", "bridge"):
        first = statistics.median(s[f"{side}_rss_mib"] for s in samples[:fifth])
        last = statistics.median(s[f"{side}_rss_mib"] for s in samples[-fifth:])
        out[f"{side}_rss_first_mib"] = round(first, 1)
        out[f"{side}_rss_last_mib"] = round(last, 1)
        out[f"{side}_rss_max_mib"] = round(max(s[f"{side}_rss_mib"] for s in samples), 1)
        out[f"{side}_fds_max"] = max(s[f"{side}_fds"] for s in samples)
        out[f"{side}_fds_first"] = samples[0][f"{side}_fds"]
        out[f"{side}_fds_idle"] = result["idle"][f"{side}_fds"]
        ok = ok and last - first <= max_growth_mib
        # At rest after the load, no more descriptors than under load at the start (+ a little slack).
        ok = ok and result["idle"][f"{side}_fds"] <= out[f"{side}_fds_max"]
    out["requests_in_flight_after"] = result["idle"]["requests_in_flight"]
    out["ok"] = ok
    return out, ok


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] / 60 for s in samples]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(t, [s["relay_rss_mib"] for s in samples], label="relay")
    ax1.plot(t, [s["bridge_rss_mib"] for s in samples], label="bridge")
    ax1.set_ylabel("RSS (MiB)")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    ax1.set_title(
        f"Soak: {result['minutes']:g} min at {result['rate']:g} req/s, "
        f"{result['counts']['ok']} ok, {result['counts']['failed']} failed"
    )
    ax2.plot(t, [s["relay_fds"] for s in samples], label="relay")
    ax2.plot(t, [s["bridge_fds"] for s in samples], label="bridge")
    ax2.set_ylabel("open file descriptors")
    ax2.set_xlabel("minutes")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--rate", type=float, default=40.0, help="requests started per second")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--max-growth-mib", type=float, default=20.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "figures")
    args = ap.parse_args()
    result = asyncio.run(soak(args.minutes, args.rate, args.concurrency, args.interval))
    summary, ok = summarize(result, args.max_growth_mib)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps({**result, "summary": summary}, indent=1))
    plot(result, args.out / "soak.png")
    print("SUMMARY " + json.dumps(summary), flush=True)
    print(f"figure: {args.out / 'soak.png'}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
