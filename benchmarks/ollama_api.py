"""Ollama's API served by the bridge (bridge/ollama/) against the engine direct, in one run: time to
first token and decode rate of one streamed chat, straight to the engine (OpenAI's API) vs through
the bridge's local endpoint and through relay + bridge, each with OpenAI's API passed through
(``/r/engine/v1``) and with Ollama's API translated by the bridge (``/r/ollama/api/chat``).

    .venv/bin/python benchmarks/ollama_api.py                      # the tiny model, 30 rounds
    .venv/bin/python benchmarks/ollama_api.py --quick              # smoke run
    .venv/bin/python benchmarks/ollama_api.py --model-file gemma.gguf --kind raw --tokens 64 --rounds 8

The real engine (deployment/engine.py: llama-cpp-python's server, one thread) on the generated tiny
model (exactly ``--tokens`` tokens at temperature 0, about 1,500 a second: the hardest case for a
layer that works per token) or a GGUF file. Each round sends one prompt, new every round so that the
relay never replays an answer, to every path in a rotating order; one warm-up round is left out.
Per request the client measures TTFT (sending the request to the first token) and the decode time
per token (first to last token, over the tokens between them); the table shows p50 and p90 over the
rounds, and the CPU time the bridge and the relay spent per token (what load hardly moves).
"The API layer" is the Ollama path against the OpenAI path through the same hops: what
translating costs, apart from the hop itself (targets: decode time +2 % at most, TTFT +5 ms at p50);
it is also given paired, the median over the rounds of the two requests' ratio (or difference),
which cancels load that drifts between rounds.

Everything runs on this machine's cores with the client: the numbers move with the machine's load
(printed), the ratios measured in the same run much less.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deployment.engine import EmbeddedEngine  # noqa: E402
from tests.procs import API_KEY, Bridge, Relay  # noqa: E402

PROMPT = "[{i:04d}] Explain in a few sentences why the sky is blue."
LOCAL = r"local endpoint on http://127\.0\.0\.1:(\d+)/"


@dataclass(frozen=True)
class Path_:
    name: str
    url: str
    api: str  # "openai" or "ollama"
    hops: str  # what it goes through, for the comparisons


@dataclass
class Sample:
    ttft_s: float
    per_token_s: float
    tokens: int
    bridge_cpu_s: float = 0.0  # CPU time the bridge (and relay) spent on the request
    relay_cpu_s: float = 0.0


def cpu_s(pid: int) -> float:
    t = psutil.Process(pid).cpu_times()
    return float(t.user + t.system)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else float("nan")


def body(api: str, kind: str, model: str, tokens: int, i: int) -> dict[str, Any]:
    """The request: a chat, or (``kind`` "raw") a plain completion of the prompt, as a base model
    without a chat template needs (Ollama's ``/api/generate`` with ``raw``, OpenAI's ``/v1/completions``)."""
    text = PROMPT.format(i=i)
    out: dict[str, Any] = {"model": model, "stream": True}
    if kind == "raw":
        out["prompt"] = text
        if api == "ollama":
            out["raw"] = True
    else:
        out["messages"] = [{"role": "user", "content": text}]
    if api == "ollama":
        out["options"] = {"num_predict": tokens, "temperature": 0}
    else:
        out.update(max_tokens=tokens, temperature=0)
    return out


def _is_token(line: bytes, api: str) -> bool:
    if api == "openai":
        if not line.startswith(b"data: {"):
            return False
        choice = (json.loads(line[6:]).get("choices") or [{}])[0]
        return bool((choice.get("delta") or {}).get("content") or choice.get("text"))
    if not line.strip():
        return False
    obj = json.loads(line)
    if "error" in obj:
        raise RuntimeError(f"stream failed: {obj['error']}")
    return not obj.get("done") and bool((obj.get("message") or {}).get("content") or obj.get("response"))


def one(client: httpx.Client, path: Path_, payload: dict[str, Any]) -> Sample:
    """One streamed chat, timed by the client."""
    first = last = 0.0
    n = 0
    buf = b""
    start = time.perf_counter()
    with client.stream("POST", path.url, json=payload) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{path.name}: {r.status_code} {r.read()[:300]!r}")
        if r.headers.get("x-bridge-idempotent") in ("joined", "replayed"):
            raise RuntimeError(f"{path.name}: the relay replayed an answer; the prompts must differ")
        for chunk in r.iter_raw():
            now = time.perf_counter()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if _is_token(line, path.api):
                    n += 1
                    first = first or now
                    last = now
    if n < 2:
        raise RuntimeError(f"{path.name}: {n} token(s)")
    return Sample(first - start, (last - first) / (n - 1), n)


def run(args: argparse.Namespace) -> dict[str, Any]:
    base = Path(tempfile.mkdtemp(prefix="bench-ollama-"))
    engine = EmbeddedEngine(args.model_file, log_path=base / "engine.log", n_ctx=args.n_ctx)
    engine.start(timeout=300)
    relay = bridge = None
    load_before = os.getloadavg()
    try:
        relay = Relay(base / "relay", "--idempotency-ttl", "0")
        routes = {"engine": engine.url, "ollama": "openai+" + engine.url}
        bridge = Bridge(relay, routes, "--listen", "127.0.0.1:0", "--sample-interval", "0")
        local = f"http://127.0.0.1:{bridge.proc.wait_for(LOCAL).group(1)}"
        oa, ol = (
            ("/v1/completions", "/api/generate")
            if args.kind == "raw"
            else ("/v1/chat/completions", "/api/chat")
        )
        paths = [
            Path_("engine direct (OpenAI API)", engine.url + oa, "openai", "direct"),
            Path_("bridge, OpenAI API passed", local + "/r/engine" + oa, "openai", "bridge"),
            Path_("bridge, Ollama API", local + "/r/ollama" + ol, "ollama", "bridge"),
            Path_("relay + bridge, OpenAI API", relay.url + "/r/engine" + oa, "openai", "relay"),
            Path_("relay + bridge, Ollama API", relay.url + "/r/ollama" + ol, "ollama", "relay"),
        ]
        samples: dict[str, list[Sample]] = {p.name: [] for p in paths}
        headers = {"Authorization": f"Bearer {API_KEY}"}
        with httpx.Client(headers=headers, timeout=600, trust_env=False) as client:
            for i in range(args.rounds + 1):
                order = paths[i % len(paths) :] + paths[: i % len(paths)]
                for path in order:
                    cpu = cpu_s(bridge.proc.popen.pid), cpu_s(relay.proc.popen.pid)
                    sample = one(client, path, body(path.api, args.kind, engine.model, args.tokens, i))
                    sample.bridge_cpu_s = cpu_s(bridge.proc.popen.pid) - cpu[0]
                    sample.relay_cpu_s = cpu_s(relay.proc.popen.pid) - cpu[1]
                    if i:  # round 0 warms everything up (the bridge reads the engine's model list)
                        samples[path.name].append(sample)
        load_after = os.getloadavg()
    finally:
        if bridge is not None:
            bridge.stop()
        if relay is not None:
            relay.proc.stop()
        engine.stop()
    paired = {}
    for hops in ("bridge", "relay"):
        a, b = (samples[p.name] for p in paths if p.hops == hops)  # OpenAI API, then Ollama API
        paired[hops] = {
            "decode_ratio_p50": percentile(
                [y.per_token_s / x.per_token_s for x, y in zip(a, b, strict=True)], 50
            ),
            "ttft_ms_diff_p50": percentile(
                [(y.ttft_s - x.ttft_s) * 1e3 for x, y in zip(a, b, strict=True)], 50
            ),
        }
    rows = {}
    for path in paths:
        got = samples[path.name]
        rows[path.name] = {
            "hops": path.hops,
            "api": path.api,
            "n": len(got),
            "tokens": got[0].tokens if got else 0,
            "ttft_ms_p50": percentile([s.ttft_s * 1e3 for s in got], 50),
            "ttft_ms_p90": percentile([s.ttft_s * 1e3 for s in got], 90),
            "per_token_ms_p50": percentile([s.per_token_s * 1e3 for s in got], 50),
            "per_token_ms_p90": percentile([s.per_token_s * 1e3 for s in got], 90),
            "tokens_per_s_p50": 1 / percentile([s.per_token_s for s in got], 50),
            # CPU time over all the requests of the path, per token (load hardly moves it)
            "bridge_cpu_us_per_token": sum(s.bridge_cpu_s for s in got) / sum(s.tokens for s in got) * 1e6,
            "relay_cpu_us_per_token": sum(s.relay_cpu_s for s in got) / sum(s.tokens for s in got) * 1e6,
        }
    return {
        "model": engine.model,
        "model_file": str(args.model_file or "generated tiny model"),
        "kind": args.kind,
        "tokens": args.tokens,
        "rounds": args.rounds,
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "cpus": os.cpu_count(),
        "rows": rows,
        "paired": paired,
    }


def report(res: dict[str, Any]) -> str:
    rows = res["rows"]
    direct = rows["engine direct (OpenAI API)"]
    out = [
        f"model {res['model']} ({res['model_file']}), {res['kind']}, {res['tokens']} tokens a request, "
        f"{res['rounds']} rounds; {res['cpus']} CPUs, load average "
        f"{res['load_avg_before'][0]:.2f} before, {res['load_avg_after'][0]:.2f} after (shared machine)",
        "",
        "| path | TTFT p50 ms | TTFT p90 ms | decode ms/token p50 | p90 | tokens/s p50 | decode vs direct "
        "| bridge CPU µs/token | relay CPU µs/token |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        ratio = r["per_token_ms_p50"] / direct["per_token_ms_p50"]
        cpu = (
            ("—", "—")
            if r["hops"] == "direct"
            else (f"{r['bridge_cpu_us_per_token']:.0f}", f"{r['relay_cpu_us_per_token']:.0f}")
        )
        if r["hops"] == "bridge":
            cpu = (cpu[0], "—")
        out.append(
            f"| {name} | {r['ttft_ms_p50']:.2f} | {r['ttft_ms_p90']:.2f} | {r['per_token_ms_p50']:.3f} | "
            f"{r['per_token_ms_p90']:.3f} | {r['tokens_per_s_p50']:.0f} | {ratio:.3f}x | "
            f"{cpu[0]} | {cpu[1]} |"
        )
    out.append("")
    for hops, label in (("bridge", "in the bridge"), ("relay", "through relay + bridge")):
        a = rows[next(n for n, r in rows.items() if r["hops"] == hops and r["api"] == "openai")]
        b = rows[next(n for n, r in rows.items() if r["hops"] == hops and r["api"] == "ollama")]
        decode = (b["per_token_ms_p50"] / a["per_token_ms_p50"] - 1) * 100
        ttft = b["ttft_ms_p50"] - a["ttft_ms_p50"]
        pair = res["paired"][hops]
        out.append(
            f"the API layer {label} (Ollama vs OpenAI API, same hops): decode time {decode:+.1f} % "
            f"(target <= +2 %), TTFT {ttft:+.2f} ms at p50 (target <= +5 ms); paired by round, p50: "
            f"decode {(pair['decode_ratio_p50'] - 1) * 100:+.1f} %, TTFT {pair['ttft_ms_diff_p50']:+.2f} ms"
        )
        extra_us = b["bridge_cpu_us_per_token"] - a["bridge_cpu_us_per_token"]
        out.append(
            f"  the bridge's CPU per token {label}: {a['bridge_cpu_us_per_token']:.0f} µs with OpenAI's API "
            f"passed, {b['bridge_cpu_us_per_token']:.0f} µs with Ollama's translated ({extra_us:+.0f} µs, "
            f"{extra_us / (b['per_token_ms_p50'] * 10):+.2f} % of the decode time per token)"
        )
        vs_direct = (b["per_token_ms_p50"] / direct["per_token_ms_p50"] - 1) * 100
        out.append(
            f"Ollama's API {label} vs the engine direct: decode time {vs_direct:+.1f} %, "
            f"TTFT {b['ttft_ms_p50'] - direct['ttft_ms_p50']:+.2f} ms at p50"
        )
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-file", type=Path, help="a GGUF file (default: the generated tiny model)")
    ap.add_argument("--tokens", type=int, default=256, help="tokens a request (num_predict / max_tokens)")
    ap.add_argument("--rounds", type=int, default=30, help="requests per path, after one warm-up round")
    ap.add_argument("--n-ctx", type=int, default=4096)
    ap.add_argument(
        "--kind",
        choices=("chat", "raw"),
        default="chat",
        help="a chat (/api/chat vs /v1/chat/completions), or a raw completion (/api/generate with raw "
        "vs /v1/completions) for a base model without a chat template",
    )
    ap.add_argument("--quick", action="store_true", help="5 rounds of 64 tokens")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens = 5, 64
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    res = run(args)
    print(report(res))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
