"""CPU of a shared answer that outgrows its cap (bridge/relay/shared.py ``Shared``): the producer
appends 100-byte chunks (an SSE token stream's size) past ``--cap`` bytes while one reader follows,
both in one event loop, no sockets. Wall time per chunk, median of ``--repeats``.

    .venv/bin/python benchmarks/shared_overflow.py                  # this checkout's bridge/
    .venv/bin/python benchmarks/shared_overflow.py --src /tmp/old   # A/B: DIR/bridge (e.g. git archive)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any


async def once(shared_cls: Any, cap: int, chunks: int) -> float:
    entry = shared_cls(cap)
    entry.start(200, [])
    token = entry.join()
    got = 0

    async def read() -> None:
        nonlocal got
        async for chunk in entry.body(token):
            got += len(chunk)

    reader = asyncio.create_task(read())
    chunk = b"x" * 100
    t0 = time.perf_counter()
    for _ in range(chunks):
        entry.append(chunk)
        if not await entry.room():
            raise RuntimeError("the reader left")
    entry.finish()
    await reader
    elapsed = time.perf_counter() - t0
    if got != 100 * chunks:
        raise RuntimeError(f"the reader got {got} bytes of {100 * chunks}")
    return elapsed / chunks


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", type=Path, default=root, help="the folder whose bridge/ is measured")
    ap.add_argument("--cap", type=int, default=1 << 20, help="the answer's cap in bytes")
    ap.add_argument("--chunks", type=int, default=0, help="chunks appended (default: 3 x the cap's worth)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(args.src))
    from bridge.relay.shared import Shared

    chunks = args.chunks or 3 * args.cap // 100
    runs = [asyncio.run(once(Shared, args.cap, chunks)) for _ in range(args.repeats)]
    per_chunk = statistics.median(runs) * 1e6
    print(f"cap {args.cap} bytes, {chunks} chunks of 100 bytes: {per_chunk:.1f} us per chunk")


if __name__ == "__main__":
    main()
