"""What a chat turn costs the Cloudflare relay in free-plan quota, measured under ``wrangler dev
--local`` (workerd) with the real bridge in front of the stand-in engine (tests/upstreams.py, 11
tokens a reply at ``--token-delay`` seconds each).

For each kind of turn it reads the relay's own counters on ``/_relay/metrics`` before and after N
turns: messages from the bridge (billed 20 to 1 as Durable Object requests), rows of the object's
SQLite storage read and written (``bridge_relay_storage_rows_total``, the SQL queries' own counts
plus one per key-value call). Worker requests and Durable Object HTTP requests are counted by the
script (one each per client request; the metrics scrapes are not counted). It also shows what the
object's start costs (it starts again after each hibernation, e.g. when a STATS sample wakes it):
the counters live in the object's memory, so an idle minute cannot be measured from outside without
keeping the object awake; README.md counts it from the design.

    .venv/bin/python benchmarks/cloudflare_quota.py                # about a minute
    .venv/bin/python benchmarks/cloudflare_quota.py --turns 20 --coalesce 0.25

deployment/cloudflare/README.md ("What the free plan allows") uses these numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conformance.workerd import WorkerdRelay  # noqa: E402
from tests.procs import Bridge, start_upstream  # noqa: E402
from tests.upstreams import MODEL  # noqa: E402


def counters(c: httpx.Client) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in c.get("/_relay/metrics").text.splitlines():
        for name, key in (
            ("bridge_relay_bridge_messages_total ", "messages"),
            ('bridge_relay_storage_rows_total{op="read"} ', "rows_read"),
            ('bridge_relay_storage_rows_total{op="written"} ', "rows_written"),
        ):
            if line.startswith(name):
                out[key] = float(line[len(name) :])
    return out


def measure(c: httpx.Client, turns: int, turn: Any, requests_per_turn: int) -> dict[str, float]:
    before = counters(c)
    for i in range(turns):
        turn(c, i)
    time.sleep(0.5)  # the last STATS request frames arrive after the answer
    after = counters(c)
    per = {k: (after[k] - before[k]) / turns for k in after}
    per["requests"] = requests_per_turn
    per["do_requests"] = requests_per_turn + per["messages"] / 20
    return per


def chat(c: httpx.Client, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    r = c.post("/r/ollama/api/chat", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    assert json.loads(r.text.splitlines()[-1])["done"] is True


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument(
        "--token-delay", type=float, default=0.033, help="seconds between tokens (a T4: ~30/s)"
    )
    parser.add_argument("--coalesce", default="0.05", help="the relay's COALESCE var")
    parser.add_argument("--stats-interval", default="60", help="the relay's STATS_INTERVAL var")
    args = parser.parse_args()
    upstream_proc, upstream = start_upstream(token_delay=args.token_delay)
    with tempfile.TemporaryDirectory(prefix="cf-quota-") as tmp:
        relay = WorkerdRelay(
            Path(tmp),
            default_route="ollama",
            extra_vars={"COALESCE": args.coalesce, "STATS_INTERVAL": args.stats_interval},
        )
        with relay.client() as c:
            start = counters(c)  # the object was just made (the readiness probe): its start alone
        bridge = Bridge(relay, {"ollama": upstream})
        try:
            with relay.client() as c:
                plain = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
                rows: list[tuple[str, dict[str, float]]] = []
                rows.append(
                    ("chat turn, streamed (plain)", measure(c, args.turns, lambda c, i: chat(c, plain), 1))
                )
                rows.append(
                    (
                        "chat turn, temperature 0 (new, kept for repeats)",
                        measure(
                            c,
                            args.turns,
                            lambda c, i: chat(c, {**plain, "options": {"temperature": 0, "seed": i}}),
                            1,
                        ),
                    )
                )
                rows.append(
                    (
                        "the same repeated (replayed from storage)",
                        measure(
                            c,
                            args.turns,
                            lambda c, i: chat(c, {**plain, "options": {"temperature": 0, "seed": i}}),
                            1,
                        ),
                    )
                )

                def job(c: httpx.Client, i: int) -> None:
                    submit = c.post(
                        "/_relay/jobs",
                        json={"route": "ollama", "path": "/api/chat", "body": {**plain, "stream": False}},
                    )
                    assert submit.status_code == 202, submit.text
                    done = c.get(submit.json()["url"], params={"wait": 30}).json()
                    assert done["state"] == "done", done

                rows.append(("job: submit + one waiting GET", measure(c, args.turns, job, 2)))
            print(
                f"COALESCE={args.coalesce} STATS_INTERVAL={args.stats_interval}"
                f" token delay {args.token_delay} s, 11 tokens a reply, {args.turns} turns each"
            )
            print(
                f"{'per turn':52} {'Worker req':>10} {'bridge msgs':>11} {'DO req':>7}"
                f" {'rows read':>9} {'rows written':>12}"
            )
            for name, r in rows:
                print(
                    f"{name:52} {r['requests']:>10.0f} {r['messages']:>11.1f} {r['do_requests']:>7.2f}"
                    f" {r['rows_read']:>9.1f} {r['rows_written']:>12.1f}"
                )
            print(f"{'the object starting (no bridge yet)':52} {'':>10} {'':>11} {'':>7}", end="")
            print(f" {start['rows_read']:>9.1f} {start['rows_written']:>12.1f}")
        finally:
            bridge.stop()
            relay.proc.stop()
            upstream_proc.stop()


if __name__ == "__main__":
    main()
