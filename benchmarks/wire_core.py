"""CPU of the sans-I/O wire core alone (bridge/wire), both ends in one process, no sockets: a small
GET (OPEN with its head, RESPONSE, one 1 KiB DATA with END_STREAM) and one streamed 60-byte DATA
chunk with its WINDOW acknowledgement. Process CPU time per operation, median of ``--repeats``.

    .venv/bin/python benchmarks/wire_core.py                      # this checkout's bridge/
    .venv/bin/python benchmarks/wire_core.py --src /tmp/old       # A/B: DIR/bridge (e.g. git archive)

Alternate the two a few times and compare medians: the machine's other load moves both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HEAD = [("host", "x"), ("user-agent", "bench"), ("accept", "*/*"), ("x-forwarded-for", "127.0.0.1")]
RESPONSE_HEAD = [("content-type", "application/json"), ("content-length", "1024")]


def established(wire: Any) -> tuple[Any, Any]:
    relay, bridge = wire.Connection(wire.Role.RELAY), wire.Connection(wire.Role.BRIDGE)
    bridge.send_hello("t", "n", ["r"])
    for m in bridge.data_to_send():
        relay.receive(m)
    relay.accept("s", 5.0)
    for m in relay.data_to_send():
        bridge.receive(m)
    return relay, bridge


def small(wire: Any, n: int) -> float:
    relay, bridge = established(wire)
    t = time.process_time()
    for _ in range(n):
        sid = relay.next_stream_id()
        relay.open_stream(sid, "GET", "r", "/small", HEAD, end_stream=True)
        for m in relay.data_to_send():
            bridge.receive(m)
        bridge.send_response(sid, 200, RESPONSE_HEAD)
        bridge.send_data(sid, b"x" * 1024, end_stream=True)
        for m in bridge.data_to_send():
            relay.receive(m)
        for m in relay.data_to_send():
            bridge.receive(m)
    return (time.process_time() - t) / n * 1e6


def chunks(wire: Any, n: int) -> float:
    relay, bridge = established(wire)
    sid = relay.next_stream_id()
    relay.open_stream(sid, "GET", "r", "/stream", HEAD, end_stream=True)
    for m in relay.data_to_send():
        bridge.receive(m)
    bridge.send_response(sid, 200, RESPONSE_HEAD)
    t = time.process_time()
    for _ in range(n):
        bridge.send_data(sid, b"y" * 60)
        for m in bridge.data_to_send():
            relay.receive(m)
        relay.acknowledge(sid, 60)
        for m in relay.data_to_send():
            bridge.receive(m)
    return (time.process_time() - t) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    root = Path(__file__).resolve().parent.parent
    ap.add_argument("--src", type=Path, default=root, help="the folder whose bridge/ is measured")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    sys.path.insert(0, str(args.src))
    from bridge import wire

    s = statistics.median(small(wire, 5000) for _ in range(args.repeats))
    c = statistics.median(chunks(wire, 20000) for _ in range(args.repeats))
    print(f"{args.src}: small GET {s:.1f} us, streamed chunk {c:.2f} us (CPU, both ends)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
