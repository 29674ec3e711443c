"""Conversation affinity (issue 18): time to first token of follow-up turns when a route has two
replicas of the real engine, balanced by conversation affinity vs least outstanding requests vs
round robin; aggregate tokens/s.

Two replicas of the embedded engine (llama-cpp-python's server behind deployment/engine_server.py)
on Gemma 3 270M (scripts/setup.d/35-gemma.sh), one thread each, with the deployment's prompt cache
(``--prompt-cache`` MiB of KV states per engine; 0: each engine keeps only its last prompt). The
bridge's own forwarding path (:class:`bridge.node.upstream.Upstreams`, in this process) sends the
requests, with ``--balance`` set per policy. Each policy gets fresh engines (no cache carried over)
and the same chats: ``--chats`` conversations, started within ``--think`` seconds of each other,
each ``--turns`` turns one after the other with a pause of 0.5-1.5 x ``--think`` seconds between an
answer and the next question (a user reading and typing: turns arrive independently, as in real
use). Turn 1 is a document of about 600 tokens and a question; each later turn resends the whole
history (the engine's answers included) plus a new question, so the prompt grows by about 100
tokens a turn, to about 1,000 at turn 5. Temperature 0 and ``--max-tokens`` tokens an answer
(answers may still differ between policies: a prompt resumed from the cache is computed in other
batches than a whole one).

TTFT: from the request handed to the bridge to the first streamed chunk with text. Follow-ups:
turns >= 2. Aggregate tokens/s: answer tokens of all chats over the policy's wall time. ``same``:
the share of follow-ups served by the replica that served the chat's previous turn.

    .venv/bin/python benchmarks/affinity.py                 # 6 chats x 5 turns, 3 policies (a few minutes)
    .venv/bin/python benchmarks/affinity.py --chats 6 --turns 6 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bridge.config import Route  # noqa: E402
from bridge.node.metering import RequestMeter  # noqa: E402
from bridge.node.upstream import Upstreams  # noqa: E402
from deployment import engine as eng  # noqa: E402

POLICIES = ("affinity", "least", "round-robin")
WORDS = (
    "river valley farmer water field summer harvest village market bridge stone road winter mill "
    "grain orchard hill forest path storm season river bank boat trade salt wool cloth town square "
    "church bell school teacher child letter story family house garden fence gate well cart horse "
    "morning evening night light candle fire kitchen bread cheese apple pear plum honey bee flower"
).split()


def document(rng: random.Random, sentences: int = 40) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
        out.append(" ".join(words).capitalize() + ".")
    return " ".join(out)


def question(rng: random.Random) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 55)))
    return f"Thinking of the {rng.choice(WORDS)} and the {rng.choice(WORDS)}: {words}. What happens next?"


class Sink:
    """The bridge's Downstream for one streamed chat completion: when its first text came, how
    many text chunks (tokens) it had, and the answer."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.tokens = 0
        self.text: list[str] = []
        self.status = 0
        self.error = ""
        self._buf = b""

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.status = status

    async def write(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {})
            text = delta.get("content")
            if text:
                if self.first is None:
                    self.first = time.perf_counter()
                self.tokens += 1
                self.text.append(text)

    async def end(self) -> None:
        pass

    async def fail(self, code: int, reason: str) -> None:
        self.error = f"{code} {reason}"


async def one_body(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def turn(ups: Upstreams, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = json.dumps(
        {"messages": messages, "model": "m", "stream": True, "temperature": 0, "max_tokens": max_tokens}
    ).encode()
    headers = [("content-type", "application/json"), ("content-length", str(len(body)))]
    meter = RequestMeter(route="engine", method="POST", target="/v1/chat/completions", via="local")
    sink = Sink()
    t0 = time.perf_counter()
    await ups.forward_http("POST", "engine", "/v1/chat/completions", headers, one_body(body), sink, meter)
    if sink.status != 200 or sink.first is None:
        raise RuntimeError(f"turn failed: status {sink.status} {sink.error}")
    return {
        "ttft": sink.first - t0,
        "total": time.perf_counter() - t0,
        "tokens": sink.tokens,
        "answer": "".join(sink.text),
        "upstream": meter.upstream,
    }


async def chat(ups: Upstreams, seed: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    messages = [{"role": "user", "content": f"Read this.\n\n{document(rng)}\n\n{question(rng)}"}]
    out = []
    await asyncio.sleep(rng.uniform(0, args.think))  # chats do not all start at once
    for n in range(1, args.turns + 1):
        if n > 1:  # the user reads the answer and types the next question
            await asyncio.sleep(rng.uniform(0.5 * args.think, 1.5 * args.think))
        result = await turn(ups, messages, args.max_tokens)
        result["turn"] = n
        result["chat"] = seed
        result["chars"] = sum(len(m["content"]) for m in messages)
        out.append(result)
        messages.append({"role": "assistant", "content": result["answer"]})
        messages.append({"role": "user", "content": question(rng)})
    return out


def start_engines(model: Path, n: int, cache_mib: int, logs: Path) -> list[eng.EmbeddedEngine]:
    engines = [
        eng.EmbeddedEngine(
            model,
            n_ctx=4096,
            n_threads=1,
            model_id="m",
            chat_format=eng.GEMMA_CHAT_FORMAT,
            max_queue=0,
            prompt_cache_mib=cache_mib,
            log_path=logs / f"engine-{i}.log",
        )
        for i in range(n)
    ]
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(lambda e: e.start(timeout=180), engines))
    return engines


async def run_policy(urls: list[str], policy: str, args: argparse.Namespace) -> dict[str, Any]:
    ups = Upstreams(tuple(Route("engine", u) for u in urls), 10.0, lambda _: None, policy)
    try:
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        chats = await asyncio.gather(*(chat(ups, 1000 + i, args) for i in range(args.chats)))
        wall = time.perf_counter() - t0
    finally:
        await ups.close()
    turns = [t for c in chats for t in c]
    follow = sorted(t["ttft"] for t in turns if t["turn"] >= 2)
    first = sorted(t["ttft"] for t in turns if t["turn"] == 1)
    same = [c[i]["upstream"] == c[i - 1]["upstream"] for c in chats for i in range(1, len(c))]
    pool = ups.pools["engine"]
    return {
        "policy": policy,
        "follow_p50": statistics.median(follow),
        "follow_p90": quantile(follow, 0.9),
        "first_p50": statistics.median(first),
        "tokens_per_s": sum(t["tokens"] for t in turns) / wall,
        "wall_s": wall,
        "same": sum(same) / len(same),
        "affinity": {k: getattr(pool.affinity, k) for k in ("new", "hits", "misses", "fallbacks")},
        "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
        "max_chars": max(t["chars"] for t in turns),
    }


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--chats", type=int, default=6, help="conversations at once")
    ap.add_argument("--turns", type=int, default=5, help="turns of each conversation")
    ap.add_argument("--max-tokens", type=int, default=24, help="tokens of each answer")
    ap.add_argument(
        "--think", type=float, default=3.0, help="mean seconds between an answer and the next turn (0: none)"
    )
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--prompt-cache", type=int, default=256, help="MiB of KV states per engine (0: none)")
    ap.add_argument("--policy", action="append", choices=POLICIES, help="only these (repeatable)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat every policy, in turn")
    ap.add_argument("--json", type=Path, default=ROOT / ".bench" / "affinity.json")
    args = ap.parse_args()
    why = eng.engine_available() or eng.gemma_available()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    bench = ROOT / ".bench"
    bench.mkdir(exist_ok=True)
    model = eng.gemma_model_file(bench / "models")
    policies = args.policy or list(POLICIES)
    results = []
    print(
        f"{args.replicas} replicas of llama.cpp on {model.name}, 1 thread each, prompt cache "
        f"{args.prompt_cache} MiB; {args.chats} chats x {args.turns} turns, {args.max_tokens} tokens an "
        f"answer, {args.think:g} s between turns; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    for r in range(args.rounds):
        for policy in policies[r % len(policies) :] + policies[: r % len(policies)]:
            engines = start_engines(model, args.replicas, args.prompt_cache, bench)
            try:
                res = asyncio.run(run_policy([e.url for e in engines], policy, args))
            finally:
                for e in engines:
                    e.stop()
            res["round"] = r
            results.append(res)
            print(
                f"  round {r} {policy:<11} follow-up TTFT p50 {res['follow_p50']:.2f} s p90 "
                f"{res['follow_p90']:.2f} s, turn 1 p50 {res['first_p50']:.2f} s, "
                f"{res['tokens_per_s']:.1f} tok/s, {res['wall_s']:.0f} s, same replica "
                f"{res['same']:.0%}, load {res['load'][0]} -> {res['load'][1]}",
                flush=True,
            )
    print()
    print("| policy | follow-up TTFT p50 | p90 | turn 1 TTFT p50 | tokens/s | same replica |")
    print("|---|---:|---:|---:|---:|---:|")
    base = None
    for policy in policies:
        rows = [r for r in results if r["policy"] == policy]
        p50 = statistics.median(r["follow_p50"] for r in rows)
        base = base if base is not None else p50
        print(
            f"| {policy} | {p50:.2f} s | {statistics.median(r['follow_p90'] for r in rows):.2f} s | "
            f"{statistics.median(r['first_p50'] for r in rows):.2f} s | "
            f"{statistics.median(r['tokens_per_s'] for r in rows):.1f} | "
            f"{statistics.median(r['same'] for r in rows):.0%} |"
        )
    for policy in policies[1:]:
        rows = [r for r in results if r["policy"] == policy]
        ratio = statistics.median(r["follow_p50"] for r in rows) / base if base else 0
        print(f"{policy} / {policies[0]} follow-up TTFT p50: {ratio:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
