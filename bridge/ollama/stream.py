"""A generation's answer: the engine's server-sent events in, Ollama's NDJSON lines out (one per
token, then the counters), and the engine's refusals as Ollama's. No I/O."""

from __future__ import annotations

import json
from typing import Any

from .generation import Generation
from .values import DECODE, ENCODE, MAX_EVENT, count, dump, rfc3339


class StreamTranslator:
    """One generation's answer: the engine's server-sent events in (:meth:`feed`), Ollama's NDJSON
    lines out, one per token, then the last line with the counters (:meth:`finish`). With
    ``"stream": false`` :meth:`feed` returns nothing and :meth:`finish` the whole answer.

    Times are ``time.monotonic_ns()`` (``arrived_ns``: the request reached the bridge; set
    :attr:`sent_ns` when it goes to the engine) and ``time.time_ns()`` for ``created_at``.
    """

    def __init__(self, gen: Generation, arrived_ns: int) -> None:
        self.gen = gen
        self.arrived_ns = arrived_ns
        self.sent_ns = arrived_ns
        self.first_ns = 0
        self.last_ns = 0
        self.tokens = 0
        self.finish_reason: str | None = None
        self.ended = False  # the engine sent [DONE]
        self.error = ""  # an error event from the engine
        self.usage: dict[str, int] = {}
        self.timings: dict[str, float] = {}
        self._buf = b""
        self._content: list[str] = []
        self._thinking: list[str] = []
        self._tools: dict[int, dict[str, str]] = {}
        self._head = b'{"model":' + dump(gen.model) + b',"created_at":"'
        self._chat = gen.kind == "chat"

    # ------------------------------------------------------------------------------ input
    def feed(self, data: bytes, now_ns: int, wall_ns: int) -> bytes:
        """Bytes of the engine's answer; returns the NDJSON lines for the client (maybe none)."""
        buf = self._buf + data if self._buf else data
        *lines, self._buf = buf.split(b"\n")
        if len(self._buf) > MAX_EVENT:
            self._buf = b""
            self.error = self.error or "the engine sent an event too long to read"
        out: list[bytes] = []
        stamp = b""
        for line in lines:
            if not line.startswith(b"data:"):
                continue  # blank separators, ":" comments (keep-alive pings), "event:" names
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.ended = True
                continue
            try:
                event = DECODE(payload.decode())
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            piece = self._event(event, now_ns)
            if piece is not None and self.gen.stream:
                stamp = stamp or rfc3339(wall_ns).encode()
                out.append(self._line(stamp, *piece))
        return b"".join(out)

    def feed_whole(self, data: bytes, now_ns: int, wall_ns: int) -> bytes:
        """An engine that answered one JSON despite ``"stream": true``: its answer as one event."""
        try:
            answer = DECODE(data.decode())
        except ValueError:
            answer = None
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            self.error = self.error or "the engine's answer is not an OpenAI completion"
            return b""
        choice = dict(choices[0])
        if isinstance(choice.get("message"), dict):
            choice["delta"] = choice.pop("message")
        event = {**answer, "choices": [choice]}
        return self.feed(b"data: " + dump(event) + b"\n\n", now_ns, wall_ns)

    def _event(self, event: dict[str, Any], now_ns: int) -> tuple[str, str] | None:
        """Take one event in; the (content, thinking) to send now, if any."""
        err = event.get("error")
        if err is not None:
            self.error = self.error or _error_message(err)
            return None
        usage = event.get("usage")
        if isinstance(usage, dict):
            for key in ("prompt_tokens", "completion_tokens"):
                if (n := count(usage.get(key))) or usage.get(key) == 0:
                    self.usage[key] = n
        timings = event.get("timings")
        if isinstance(timings, dict):
            for key in ("cache_n", "prompt_n", "prompt_ms", "predicted_n", "predicted_ms"):
                v = timings.get(key)
                if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
                    self.timings[key] = float(v)
        choices = event.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return None
        choice = choices[0]
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta")
        content = ""
        thinking = ""
        if isinstance(delta, dict):
            content = delta.get("content") or ""
            thinking = delta.get("reasoning_content") or delta.get("reasoning") or ""
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                self._gather_tools(calls)
                if calls:
                    self._token(now_ns)
        elif isinstance(choice.get("text"), str):  # /v1/completions
            content = choice["text"]
        if not isinstance(content, str) or not isinstance(thinking, str) or not (content or thinking):
            return None
        self._token(now_ns)
        if not self.gen.stream:
            self._content.append(content)
            if thinking:
                self._thinking.append(thinking)
        return content, thinking

    def _token(self, now_ns: int) -> None:
        self.tokens += 1
        if not self.first_ns:
            self.first_ns = now_ns
        self.last_ns = now_ns

    def _gather_tools(self, calls: list[Any]) -> None:
        for call in calls:
            if not isinstance(call, dict):
                continue
            index: int = call["index"] if isinstance(call.get("index"), int) else len(self._tools)
            acc = self._tools.setdefault(index, {"id": "", "name": "", "arguments": ""})
            if isinstance(call.get("id"), str):
                acc["id"] += call["id"]
            fn = call.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    acc["name"] += fn["name"]
                if isinstance(fn.get("arguments"), str):
                    acc["arguments"] += fn["arguments"]

    def _line(self, stamp: bytes, content: str, thinking: str) -> bytes:
        text = ENCODE(content).encode()
        extra = b',"thinking":' + ENCODE(thinking).encode() if thinking else b""
        key = b'","message":{"role":"assistant","content":' if self._chat else b'","response":'
        close = b'},"done":false}\n' if self._chat else b',"done":false}\n'
        return self._head + stamp + key + text + extra + close

    # ------------------------------------------------------------------------------ output
    def counters(self, now_ns: int) -> dict[str, int]:
        """Ollama's counters (ns), zero ones left out as Go's ``omitempty`` does."""
        t = self.timings
        first = self.first_ns or now_ns
        out = {
            "total_duration": now_ns - self.arrived_ns,
            "load_duration": self.sent_ns - self.arrived_ns,
        }
        if "prompt_n" in t:
            out["prompt_eval_count"] = int(t.get("cache_n", 0) + t["prompt_n"])
        elif "prompt_tokens" in self.usage:
            out["prompt_eval_count"] = self.usage["prompt_tokens"]
        out["prompt_eval_duration"] = int(t["prompt_ms"] * 1e6) if "prompt_ms" in t else first - self.sent_ns
        if "predicted_n" in t:
            out["eval_count"] = int(t["predicted_n"])
        elif "completion_tokens" in self.usage:
            out["eval_count"] = self.usage["completion_tokens"]
        else:
            out["eval_count"] = self.tokens
        if "predicted_ms" in t:
            out["eval_duration"] = int(t["predicted_ms"] * 1e6)
        else:
            out["eval_duration"] = self.last_ns - first if self.last_ns else 0
        return {k: max(0, v) for k, v in out.items() if v > 0}

    @property
    def failure(self) -> str:
        """Why the answer cannot be finished (the engine sent an error, or stopped before saying it
        was done), or empty."""
        if self.error:
            return self.error
        if self.finish_reason is None and not self.ended:
            return "the engine's answer ended before it was finished"
        return ""

    def finish(self, now_ns: int, wall_ns: int) -> dict[str, Any]:
        """The last line (streamed) or the whole answer (``"stream": false``); check
        :attr:`failure` first."""
        out: dict[str, Any] = {"model": self.gen.model, "created_at": rfc3339(wall_ns)}
        text = "".join(self._content)
        thinking = "".join(self._thinking)
        if self._chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if thinking:
                message["thinking"] = thinking
            if self._tools:
                message["tool_calls"] = self._tool_calls()
            out["message"] = message
        else:
            out["response"] = text
            if thinking:
                out["thinking"] = thinking
        out["done"] = True
        out["done_reason"] = "length" if self.finish_reason == "length" else "stop"
        out.update(self.counters(now_ns))
        return out

    def _tool_calls(self) -> list[dict[str, Any]]:
        calls = []
        for index in sorted(self._tools):
            acc = self._tools[index]
            try:
                args = json.loads(acc["arguments"]) if acc["arguments"].strip() else {}
            except ValueError:
                args = {"_raw": acc["arguments"]}  # what the engine produced, not valid JSON
            call: dict[str, Any] = {"function": {"index": index, "name": acc["name"], "arguments": args}}
            if acc["id"]:
                call = {"id": acc["id"], **call}
            calls.append(call)
        return calls


def failure_line(message: str) -> bytes:
    """The line that ends a stream that failed after it started, as Ollama's ``streamResponse``
    writes it."""
    return dump({"error": message}) + b"\n"


def _error_message(err: Any) -> str:
    if isinstance(err, dict):
        msg = err.get("message")
        return str(msg) if msg else json.dumps(err)[:500]
    return str(err)[:500]


def engine_error(status: int, raw: bytes) -> tuple[int, str]:
    """An engine's refusal (OpenAI's ``{"error": {"message": ...}}``, FastAPI's ``{"detail": ...}``,
    or text) as Ollama's status and message. A traceback the engine appends is cut off."""
    message = ""
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if isinstance(obj, dict) and obj.get("error") is not None:
        message = _error_message(obj["error"])
    elif isinstance(obj, dict) and obj.get("detail") is not None:
        detail = obj["detail"]
        if isinstance(detail, list):
            message = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
        else:
            message = str(detail)
    else:
        message = raw.decode("utf-8", "replace").strip()[:500]
    message = message.split("\n\n", 1)[0].strip() or f"the engine answered {status}"
    return (400 if status == 422 else status), message
