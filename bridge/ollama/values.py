"""Small values of Ollama's API, as Ollama writes and reads them (Go's JSON encoder, ``time.Time``,
``Duration``, its unmarshal errors); the rest of the translation builds on them. No I/O."""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from ..errors import RequestRefused

#: The Ollama version whose API this package follows (read from its source, see bridge/ollama/api.py);
#: what ``/api/version`` answers.
OLLAMA_VERSION = "0.33.0-rc2"
#: ``/api/version``'s one field more (Ollama answers only ``version``; clients ignore the rest): says
#: that the Ollama API is the bridge's own layer over an OpenAI-compatible engine, not an Ollama.
SERVED_BY = "kaggle-bridge over an OpenAI-compatible engine"
NDJSON = "application/x-ndjson"
JSON_TYPE = "application/json; charset=utf-8"
#: Longest partial line kept from the engine's stream (one event); longer is an error.
MAX_EVENT = 4 * 1024 * 1024
#: ``keep_alive`` below zero keeps a model loaded for ever: Go's largest duration (ns).
FOREVER_NS = 2**63 - 1


#: One encoder made once (``json.dumps`` with options builds a new one per call: per token, that
#: was a fifth of the translation's time).
ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
DECODE = json.JSONDecoder().decode


def dump(obj: Any) -> bytes:
    """JSON as Ollama writes it (Go's encoder): compact, UTF-8."""
    return ENCODE(obj).encode()


_second: list[Any] = [-1, ""]  # the last second formatted, and its text


def rfc3339(wall_ns: int) -> str:
    """Go's ``time.Time`` JSON for a UTC time: RFC 3339, up to 9 fraction digits, zeros trimmed."""
    secs, ns = divmod(wall_ns, 1_000_000_000)
    if _second[0] != secs:
        _second[:] = [secs, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))]
    text: str = _second[1]
    if ns:
        text += "." + f"{ns:09d}".rstrip("0")
    return text + "Z"


def human_number(n: int) -> str:
    """Ollama's ``format.HumanNumber`` (a parameter count: ``"270.43M"``, ``"8B"``)."""
    for unit, scale, digits in (("B", 10**9, 1), ("M", 10**6, 2)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f}{unit}" if value == math.floor(value) else f"{value:.{digits}f}{unit}"
    return f"{n / 1000:.0f}K" if n >= 1000 else str(n)


_DURATION = re.compile(r"([0-9]*(?:\.[0-9]*)?)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "μs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9}
_UNIT_NS["h"] = 3600 * 10**9


def parse_keep_alive(value: Any) -> int | None:
    """``keep_alive`` as Ollama reads it (api/types.go ``Duration.UnmarshalJSON``): a number of
    seconds or a Go duration string (``"5m"``, ``"1h30m"``); below zero means for ever. Returns
    nanoseconds, None when absent."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return FOREVER_NS if value < 0 else int(value * 1e9)
    if not isinstance(value, str):
        raise RequestRefused(400, f"Unsupported type: '{go_kind(value)}'")
    text = value.strip()
    sign = -1 if text.startswith("-") else 1
    body = text.lstrip("+-")
    if body == "0":
        return 0
    total = 0.0
    pos = 0
    while pos < len(body):
        m = _DURATION.match(body, pos)
        if not m or m.group(1) in ("", "."):
            raise RequestRefused(400, f"time: invalid duration {json.dumps(value)}")
        total += float(m.group(1)) * _UNIT_NS[m.group(2)]
        pos = m.end()
    if not body:
        raise RequestRefused(400, f"time: invalid duration {json.dumps(value)}")
    return FOREVER_NS if sign < 0 else int(total)


def go_kind(value: Any) -> str:
    """The JSON kind of a value as Go's decoder names it in its errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def typed(req: dict[str, Any], key: str, kind: type | tuple[type, ...], go_type: str) -> Any:
    """``req[key]`` when absent (None) or of ``kind``; else Go's unmarshal error, 400."""
    value = req.get(key)
    if value is None:
        return None
    bad_bool = isinstance(value, bool) and kind is not bool
    if bad_bool or not isinstance(value, kind):
        raise RequestRefused(
            400, f"json: cannot unmarshal {go_kind(value)} into Go struct field .{key} of type {go_type}"
        )
    return value


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as Ollama's handlers bind it: empty is ``missing request body``, anything but
    a JSON object is 400."""
    if not raw.strip():
        raise RequestRefused(400, "missing request body")
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestRefused(400, f"invalid JSON in the request body: {exc}") from None
    if not isinstance(obj, dict):
        raise RequestRefused(400, f"json: cannot unmarshal {go_kind(obj)} into Go value of type api.Request")
    return obj


def count(value: Any) -> int:
    """A positive integer, else 0 (a count or size an engine may leave out or send as anything)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
