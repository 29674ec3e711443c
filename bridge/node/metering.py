"""Per-request measurement where the bridge forwards, and the bridge's append-only JSONL log.

A :class:`RequestMeter` watches one forwarded exchange: it is told when the request reached the
bridge, when it went to an upstream, and sees every response chunk *after* it was handed on (it
never holds bytes back). It parses the two streaming formats incrementally, keeping only the
current partial line:

- Ollama's NDJSON (``/api/chat``, ``/api/generate``): time to first token from the bridge's clock,
  and Ollama's own counters from the final line (``eval_count``/``eval_duration``,
  ``prompt_eval_count``/``prompt_eval_duration``, ``load_duration``, ``total_duration``); the decode
  rate is also computed from the bridge's clock (``tokens_per_s_bridge``) as a cross-check;
- OpenAI-style SSE (``/v1/chat/completions``, ``/v1/completions``): tokens counted from the chunks,
  replaced by ``usage`` when the stream carries it (and llama.cpp's ``timings`` when present).

A non-streamed JSON answer (``"stream": false``) is parsed whole when it is small (≤ 1 MiB).

The finished record is a plain dict, the same shape as the STATS ``request`` body the relay
publishes (docs/protocol.md §12a) plus a few local fields; :class:`MetricsLog` appends it to a JSONL
file, one line per request and one per GPU/host sample.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("bridge.metrics")

#: Longest line kept while parsing a stream (a longer one stops the parsing, never the forwarding).
MAX_LINE = 1024 * 1024
#: Largest non-streamed JSON answer parsed for counters.
MAX_JSON = 1024 * 1024
#: The file name of the log inside --metrics-dir.
LOG_NAME = "bridge-metrics.jsonl"

_NS = 1e-9
#: The counters Ollama puts on the last line of a generation (durations in nanoseconds).
OLLAMA_COUNTERS = (
    "eval_count",
    "eval_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "load_duration",
    "total_duration",
)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class RequestMeter:
    """Measures one request; see the module docstring. All times are ``time.monotonic()``."""

    def __init__(
        self,
        *,
        route: str,
        method: str,
        target: str,
        via: str,
        request_id: str = "",
        arrived: float | None = None,
    ) -> None:
        self.route = route
        self.method = method
        self.target = target
        self.via = via  # "tunnel" or "local"
        self.request_id = request_id[:64]
        self.arrived = time.monotonic() if arrived is None else arrived
        self.started_at = time.time()
        self.upstream = ""
        self.sent_at: float | None = None
        self.head_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.status: int | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.model = ""
        self.chunks = 0  # token-bearing lines or events seen
        self.counters: dict[str, int] = {}
        self.usage: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self._format = ""  # "ndjson", "sse", "json" or "" (not parsed)
        self._buf = bytearray()
        self._parsing = False

    # ------------------------------------------------------------------------------ events
    def sent(self, upstream: str) -> None:
        """The request is being sent to ``upstream`` (a URL)."""
        self.upstream = upstream
        self.sent_at = time.monotonic()

    def response(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.head_at = time.monotonic()
        self.status = status
        ctype, encoded = "", False
        for name, value in headers:
            lname = name.lower()
            if lname == "content-type":
                ctype = value.split(";")[0].strip().lower()
            elif lname == "content-encoding" and value.strip().lower() not in ("", "identity"):
                encoded = True
        if encoded:
            return
        if ctype == "application/x-ndjson":
            self._format = "ndjson"
        elif ctype == "text/event-stream":
            self._format = "sse"
        elif ctype == "application/json":
            self._format = "json"
        self._parsing = bool(self._format)

    def request_bytes(self, n: int) -> None:
        self.bytes_in += n

    def chunk(self, data: bytes) -> None:
        """A response chunk that was just forwarded."""
        self.bytes_out += len(data)
        if not self._parsing or not data:
            return
        if self._format == "json":
            if len(self._buf) + len(data) > MAX_JSON:
                self._stop_parsing()
            else:
                self._buf += data
            return
        now = time.monotonic()
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            if self._buf:
                self._buf += data[start:nl]
                line = bytes(self._buf)
                self._buf.clear()
            else:
                line = data[start:nl]
            self._line(line, now)
            start = nl + 1
        if start < len(data):
            if len(self._buf) + len(data) - start > MAX_LINE:
                self._stop_parsing()
            else:
                self._buf += data[start:]

    def _stop_parsing(self) -> None:
        self._parsing = False
        self._buf.clear()

    def _line(self, line: bytes, now: float) -> None:
        line = line.strip()
        if not line:
            return
        if self._format == "sse":
            if not line.startswith(b"data:"):
                return
            line = line[5:].strip()
            if line == b"[DONE]":
                return
        try:
            obj = json.loads(line)
        except ValueError:
            return
        if isinstance(obj, dict):
            if self._format == "ndjson":
                self._ollama(obj, now)
            else:
                self._openai(obj, now)

    def _token(self, now: float) -> None:
        if self._format == "json":  # a whole answer at once: no first token to time
            return
        self.chunks += 1
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now

    def _ollama(self, obj: dict[str, Any], now: float) -> None:
        if not self.model and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        message = obj.get("message")
        text = obj.get("response")
        if isinstance(message, dict):
            text = (message.get("content") or "") + (message.get("thinking") or "")
            if message.get("tool_calls"):
                text = text or "tool"
        elif isinstance(obj.get("thinking"), str):
            text = (text or "") + obj["thinking"]
        if obj.get("done") is not True:
            if isinstance(text, str) and text:
                self._token(now)
            return
        if isinstance(text, str) and text:  # a final line may carry the last piece
            self._token(now)
        for key in OLLAMA_COUNTERS:
            value = _int(obj.get(key))
            if value is not None:
                self.counters[key] = value

    def _openai(self, obj: dict[str, Any], now: float) -> None:
        if not self.model and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if not isinstance(choice, dict):
                    continue
                delta = choice.get("delta") if self._format == "sse" else choice.get("message")
                text = choice.get("text")
                if isinstance(delta, dict):
                    text = (
                        (delta.get("content") or "")
                        + (delta.get("reasoning_content") or "")
                        + (delta.get("reasoning") or "")
                    )
                    if delta.get("tool_calls"):
                        text = text or "tool"
                if isinstance(text, str) and text and self._format == "sse":
                    self._token(now)
                    break
        usage = obj.get("usage")
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens"):
                value = _int(usage.get(key))
                if value is not None:
                    self.usage[key] = value
        timings = obj.get("timings")  # llama.cpp's server
        if isinstance(timings, dict):
            for key in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms"):
                value = timings.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                    self.timings[key] = float(value)

    # ------------------------------------------------------------------------------ result
    def finish(self, error: str = "") -> dict[str, Any]:
        """The record of the finished (or failed) request."""
        end = time.monotonic()
        if self._format == "json" and self._parsing and self._buf:
            try:
                obj = json.loads(bytes(self._buf))
            except ValueError:
                obj = None
            self._buf.clear()
            if isinstance(obj, dict):
                if "choices" in obj:
                    self._openai(obj, end)
                else:
                    self._ollama(obj, end)
        rec: dict[str, Any] = {
            "kind": "request",
            "ts": round(self.started_at, 6),
            "route": self.route,
            "model": self.model,
            "status": self.status if self.status is not None else 0,
            "method": self.method,
            "path": self.target.split("?", 1)[0][:200],
            "via": self.via,
            "upstream": self.upstream,
            "queue_s": _round((self.sent_at or end) - self.arrived),
            "total_s": _round(end - self.arrived),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }
        if self.request_id:
            rec["request_id"] = self.request_id
        if self.head_at is not None:
            rec["head_s"] = _round(self.head_at - self.arrived)
        if self.first_token_at is not None:
            rec["ttft_s"] = _round(self.first_token_at - self.arrived)
        c = self.counters
        completion = c.get("eval_count", self.usage.get("completion_tokens"))
        if completion is None and "predicted_n" in self.timings:
            completion = int(self.timings["predicted_n"])
        if completion is None and self.chunks:
            completion = self.chunks
        if completion is not None:
            rec["completion_tokens"] = completion
        prompt = c.get("prompt_eval_count", self.usage.get("prompt_tokens"))
        if prompt is None and "prompt_n" in self.timings:
            prompt = int(self.timings["prompt_n"])
        if prompt is not None:
            rec["prompt_tokens"] = prompt
        # Decoding rate: the engine's own counters first, the bridge's clock as a cross-check.
        bridge_rate = None
        if (
            self.first_token_at is not None
            and self.last_token_at is not None
            and self.last_token_at > self.first_token_at
            and self.chunks > 1
        ):
            bridge_rate = (self.chunks - 1) / (self.last_token_at - self.first_token_at)
            rec["tokens_per_s_bridge"] = _round(bridge_rate, 2)
        if c.get("eval_duration") and "eval_count" in c:
            rec["tokens_per_s"] = _round(c["eval_count"] / (c["eval_duration"] * _NS), 2)
        elif self.timings.get("predicted_ms") and "predicted_n" in self.timings:
            rec["tokens_per_s"] = _round(self.timings["predicted_n"] / self.timings["predicted_ms"] * 1000, 2)
        elif bridge_rate is not None:
            rec["tokens_per_s"] = _round(bridge_rate, 2)
        if c.get("prompt_eval_duration") and "prompt_eval_count" in c:
            rec["prompt_tokens_per_s"] = _round(c["prompt_eval_count"] / (c["prompt_eval_duration"] * _NS), 2)
        elif self.timings.get("prompt_ms") and "prompt_n" in self.timings:
            rec["prompt_tokens_per_s"] = _round(
                self.timings["prompt_n"] / self.timings["prompt_ms"] * 1000, 2
            )
        for key, out in (
            ("load_duration", "load_s"),
            ("prompt_eval_duration", "prompt_eval_s"),
            ("eval_duration", "eval_s"),
            ("total_duration", "engine_total_s"),
        ):
            if key in c:
                rec[out] = _round(c[key] * _NS)
        if "ttft_s" in rec and "prompt_eval_s" in rec:
            # Time to first token the engine does not account for: its queue, the tunnel-free hop.
            rec["engine_wait_s"] = _round(
                max(0.0, rec["ttft_s"] - rec["prompt_eval_s"] - rec.get("load_s", 0))
            )
        if error:
            rec["error"] = error[:300]
        return rec

    @property
    def generation(self) -> bool:
        """True when this was an LLM generation (tokens or engine counters seen)."""
        return bool(self.chunks or self.counters or self.usage or self.timings)


def _round(value: float, digits: int = 6) -> float:
    return round(max(0.0, value), digits)


def describe(rec: dict[str, Any]) -> str:
    """One human line for the log: route, model, status, TTFT, tok/s (no secrets: no headers)."""
    parts = [f"{rec.get('method', '')} {rec['route']}{rec.get('path', '')}", f"-> {rec.get('status')}"]
    if rec.get("model"):
        parts.append(f"model={rec['model']}")
    if "ttft_s" in rec:
        parts.append(f"ttft={rec['ttft_s'] * 1000:.0f}ms")
    if "tokens_per_s" in rec:
        parts.append(f"tok/s={rec['tokens_per_s']:.1f}")
    if "tokens_per_s_bridge" in rec:
        parts.append(f"(bridge clock {rec['tokens_per_s_bridge']:.1f})")
    if "prompt_tokens" in rec:
        parts.append(f"prompt={rec['prompt_tokens']}")
    if "completion_tokens" in rec:
        parts.append(f"completion={rec['completion_tokens']}")
    parts.append(f"total={rec['total_s']:.3f}s via={rec.get('via', '')}")
    if rec.get("error"):
        parts.append(f"error={rec['error']}")
    return " ".join(parts)


class MetricsLog:
    """Append-only JSONL: one line per record, written with one ``write`` on an O_APPEND file so
    that lines never interleave. ``None`` directory: records go nowhere (but are still returned)."""

    def __init__(self, directory: Path | None) -> None:
        self.path: Path | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            self.path = directory / LOG_NAME
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            return
        line = json.dumps(record, separators=(",", ":"), default=str).encode() + b"\n"
        with self._lock:
            try:
                os.write(self._fd, line)
            except OSError as exc:  # a full disk must not stop the forwarding
                log.warning("metrics log %s: %s", self.path, exc)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def read_log(path: Path) -> list[dict[str, Any]]:
    """Every record of a JSONL log (a torn last line is skipped)."""
    out: list[dict[str, Any]] = []
    with path.open("rb") as f:
        for line in f:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out
