"""Summarise py-spy's collapsed stacks (``run.py --py-spy DIR`` writes ``DIR/<process>-<phase>.txt``):
the functions with the most samples on CPU, inclusive ("in it or below it") and self ("in it").

    .venv/bin/python benchmarks/spy_top.py .bench/spy/bridge-small.txt [--top 30] [--filter bridge/]

A line of py-spy's ``raw`` format is ``frame;frame;...;frame COUNT``, outermost frame first, each frame
``function (file:line)``. Idle samples (the event loop waiting in ``select``/``epoll``) are counted apart.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")
IDLE = ("select (selectors.py", "poll (selectors.py", "run_forever (uvloop", "_run_once (asyncio/base_events")


def frame_name(frame: str, *, short: bool = True) -> str:
    """``func (path/to/file.py:123)`` -> ``func (to/file.py)`` (line numbers dropped, path cut)."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    file = m["file"]
    if short:
        for marker in ("site-packages/", "/lib/python3.11/", "/work/main/", "bridgecopy/"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
    return f"{m['func']} ({file})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        m = _LINE.match(line)
        if m:
            stacks.append(([frame_name(f) for f in m[1].split(";")], int(m[2])))
    return stacks


def report(path: Path, top: int, pattern: str) -> str:
    stacks = load(path)
    total = sum(n for _, n in stacks)
    busy = [(s, n) for s, n in stacks if not any(s[-1].startswith(i) for i in IDLE)]
    busy_total = sum(n for _, n in busy)
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    for frames, n in busy:
        for f in set(frames):
            inclusive[f] += n
        own[frames[-1]] += n
    out = [f"{path}: {total} samples, {busy_total} busy ({100 * busy_total / max(1, total):.0f}%)"]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        out.append(f"  -- {title} (% of busy samples)")
        shown = 0
        for f, n in counter.most_common():
            if pattern and pattern not in f:
                continue
            out.append(f"  {100 * n / max(1, busy_total):5.1f}%  {f}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--filter", default="", help="only frames whose text contains this")
    args = parser.parse_args(argv)
    for path in args.files:
        print(report(path, args.top, args.filter))
    return 0


if __name__ == "__main__":
    sys.exit(main())
