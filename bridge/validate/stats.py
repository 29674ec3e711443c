"""Medians and spread: what a validation run reports, per request and per batch (used by the run
and by the report)."""

from __future__ import annotations

import statistics
from typing import Any


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; values need not be sorted."""
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def spread(values: list[float]) -> dict[str, float] | None:
    """Median and spread (p10, p90, min, max) of the values; None when there are none."""
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 6),
        "p10": round(_pct(values, 0.1), 6),
        "p90": round(_pct(values, 0.9), 6),
        "min": round(min(values), 6),
        "max": round(max(values), 6),
        "n": len(values),
    }


def summarize(results: list[dict[str, Any]], batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (concurrency, case): medians and spread of what the client saw (and the bridge, when
    joined), and the aggregate throughput of the batches."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for rec in results:
        groups.setdefault((rec["concurrency"], rec["case"]), []).append(rec)
    rows = []
    for (level, case), recs in sorted(groups.items()):
        ok = [r for r in recs if r["ok"]]
        bats = [b for b in batches if b["concurrency"] == level and b["case"] == case]
        row: dict[str, Any] = {
            "concurrency": level,
            "case": case,
            "prompt_kind": recs[0]["prompt_kind"],
            "max_tokens": recs[0]["max_tokens"],
            "requests": len(recs),
            "errors": len(recs) - len(ok),
            "ttft_s": spread([r["ttft_s"] for r in ok if "ttft_s" in r]),
            "total_s": spread([r["total_s"] for r in ok]),
            "tokens_per_s": spread([r["tokens_per_s"] for r in ok if "tokens_per_s" in r]),
            "prompt_tokens": spread([float(r["prompt_tokens"]) for r in ok if "prompt_tokens" in r]),
            "prompt_chars": spread([float(r["prompt_chars"]) for r in ok if "prompt_chars" in r]),
            "completion_tokens": spread([float(r["completion_tokens"]) for r in ok]),
            "throughput_tokens_per_s": spread([b["throughput_tokens_per_s"] for b in bats]),
            "bridge_ttft_s": spread([r["bridge"]["ttft_s"] for r in ok if "ttft_s" in r.get("bridge", {})]),
            "tunnel_ttft_overhead_s": spread(
                [r["tunnel_ttft_overhead_s"] for r in ok if "tunnel_ttft_overhead_s" in r]
            ),
        }
        rows.append(row)
    return rows
