"""Ollama's REST API on top of an engine that speaks only OpenAI's: the translation, without I/O.

Requests come in as parsed JSON, go out as an OpenAI request body (``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``); the engine's server-sent events come in as bytes and go out
as Ollama's NDJSON lines (or one JSON answer for ``"stream": false``). The asyncio part that drives
this is :mod:`bridge.ollama.front`. A refused request raises :class:`~bridge._exceptions.RequestRefused`
with the status and message Ollama would answer (``{"error": "..."}``).

Checked against Ollama's own source (github.com/ollama/ollama at v0.33.0-rc2, commit fb30760):

- ``api/types.go``: the request and response fields (``GenerateRequest``, ``ChatRequest``,
  ``Options`` and ``Runner`` with their JSON kinds, ``Metrics`` in nanoseconds with ``omitempty``,
  ``ThinkValue``, ``Duration`` for ``keep_alive``, ``ListModelResponse``, ``ProcessModelResponse``,
  ``ShowResponse`` whose ``model_info`` is never omitted);
- ``server/routes.go``: ``ChatHandler``, ``GenerateHandler``, ``EmbedHandler``, ``EmbeddingsHandler``,
  ``ShowHandler``, ``PsHandler``: the error shapes and codes (``{"error": "model 'x' not found"}``
  with 404, ``"missing request body"`` 400, ``"model is required"`` 400, ``"%q does not support
  thinking"`` 400 for a model without thinking, ``top_logprobs`` 0..20), the answers with
  ``done_reason`` ``"load"`` (no messages / empty prompt) and ``"unload"`` (and ``keep_alive`` 0);
  ``streamResponse``: one JSON object and ``\\n`` per chunk, ``Content-Type: application/x-ndjson``;
  an error after the first chunk is one more line ``{"error": "..."}`` and the stream ends;
  ``created_at`` is Go's ``time.Time`` in UTC (RFC 3339 with up to 9 fraction digits);
- ``llm/llama_server.go``: Ollama's own runner over llama.cpp's ``llama-server`` speaks OpenAI's chat
  API, the same mapping as here: options to request fields (``llamaServerChatRequest``),
  ``finish_reason`` ``"length"`` to ``done_reason`` ``"length"`` and anything else to ``"stop"``,
  ``timings`` to the counters (``prompt_eval_count`` = ``cache_n + prompt_n``), ``delta.reasoning_content``
  to ``thinking``, streamed ``tool_calls`` gathered and sent with the last line, ``format`` to
  ``response_format``;
- and the ``ollama`` Python client 0.6.3 (``_types.py``: every response field is optional except
  ``ShowResponse.model_info``; ``_client.py``: a streamed line with ``"error"`` raises ``ResponseError``).

What cannot map onto an OpenAI-only engine, and what happens instead:

- options fixed when the engine loaded the model (``num_ctx``, ``num_batch``, ``num_gpu``,
  ``main_gpu``, ``use_mmap``, ``num_thread``, ``draft_num_predict``) are checked and ignored, as are
  options Ollama itself no longer knows (``mirostat``, ``tfs_z``, ``penalize_newline``, ...);
  options left out keep the engine's defaults (they play the part of a Modelfile's ``PARAMETER``);
- ``template`` (a Go template the engine cannot run): 400; ``context`` (token ids from an older
  answer): ignored (deprecated in Ollama too), and answers carry none; ``logprobs``: not returned;
- ``think``: the engine's models count as models without thinking, as Ollama answers for those:
  ``true`` or a level is 400, ``false`` is passed on (``chat_template_kwargs.enable_thinking``);
  reasoning the engine streams anyway (``reasoning_content``) comes back as ``thinking``;
- ``format``: ``"json"`` becomes ``{"type": "json_object"}``; a JSON schema becomes
  ``{"type": "json_object", "schema": ...}``, the form llama.cpp's servers take (llama-cpp-python
  refuses OpenAI's ``json_schema`` type);
- ``keep_alive`` is checked and accepted; the engine keeps its model loaded whatever it says;
- ``/api/tags``, ``/api/ps``, ``/api/show`` describe what ``/v1/models`` tells: the id, and size,
  parameter count and training context where the engine gives them (llama.cpp's ``llama-server``
  does, in ``meta``); the ``digest`` is the SHA-256 of the model's id, not of a file;
- counters come from the engine when it reports them (``usage``, asked for with
  ``stream_options.include_usage``; llama.cpp's ``timings``); otherwise the bridge measures them
  on its own clock: ``eval_count`` is the number of streamed tokens, ``eval_duration`` the time from
  the first to the last, ``prompt_eval_duration`` the time from sending the request to the first
  token (llama.cpp's own convention for its timings), ``load_duration`` the bridge's own time
  before it sent the request (the engine keeps its model loaded), ``total_duration`` the whole;
  llama-cpp-python reports no usage when streaming, so ``prompt_eval_count`` is absent there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._exceptions import RequestRefused

#: The Ollama version whose API this module follows (read from its source, see above); what
#: ``/api/version`` answers.
OLLAMA_VERSION = "0.33.0-rc2"
NDJSON = "application/x-ndjson"
JSON_TYPE = "application/json; charset=utf-8"
#: Longest partial line kept from the engine's stream (one event); longer is an error.
MAX_EVENT = 4 * 1024 * 1024
#: ``keep_alive`` below zero keeps a model loaded for ever: Go's largest duration (ns).
FOREVER_NS = 2**63 - 1

_THINK_LEVELS = ("high", "medium", "low", "max")
#: Ollama's options (api/types.go ``Options`` and ``Runner``) and the JSON kind each must have.
OPTION_KINDS: dict[str, str] = {
    "num_keep": "integer",
    "seed": "integer",
    "num_predict": "integer",
    "top_k": "integer",
    "top_p": "float32",
    "min_p": "float32",
    "typical_p": "float32",
    "repeat_last_n": "integer",
    "temperature": "float32",
    "repeat_penalty": "float32",
    "presence_penalty": "float32",
    "frequency_penalty": "float32",
    "stop": "array",
    "num_ctx": "integer",
    "num_batch": "integer",
    "num_gpu": "integer",
    "main_gpu": "integer",
    "use_mmap": "boolean",
    "num_thread": "integer",
    "draft_num_predict": "integer",
}
#: Options sent to the engine, under the name OpenAI's API or llama.cpp's servers give them (the
#: names Ollama's own llama-server runner uses, llm/llama_server.go ``llamaServerChatRequest``).
OPTION_FIELDS: dict[str, str] = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "typical_p": "typical_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "repeat_last_n": "repeat_last_n",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "num_keep": "n_keep",
}
#: Options fixed when the engine loaded its model: checked, then ignored.
LOAD_TIME_OPTIONS = frozenset(OPTION_KINDS) - frozenset(OPTION_FIELDS)


# ---------------------------------------------------------------------------------- small values
#: One encoder made once (``json.dumps`` with options builds a new one per call: per token, that
#: was a fifth of the translation's time).
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_DECODE = json.JSONDecoder().decode


def dump(obj: Any) -> bytes:
    """JSON as Ollama writes it (Go's encoder): compact, UTF-8."""
    return _ENCODE(obj).encode()


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
        raise RequestRefused(400, f"Unsupported type: '{_go_kind(value)}'")
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


def _go_kind(value: Any) -> str:
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


def _typed(req: dict[str, Any], key: str, kind: type | tuple[type, ...], go_type: str) -> Any:
    """``req[key]`` when absent (None) or of ``kind``; else Go's unmarshal error, 400."""
    value = req.get(key)
    if value is None:
        return None
    bad_bool = isinstance(value, bool) and kind is not bool
    if bad_bool or not isinstance(value, kind):
        raise RequestRefused(
            400, f"json: cannot unmarshal {_go_kind(value)} into Go struct field .{key} of type {go_type}"
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
        raise RequestRefused(400, f"json: cannot unmarshal {_go_kind(obj)} into Go value of type api.Request")
    return obj


# ---------------------------------------------------------------------------------- models
@dataclass(frozen=True, slots=True)
class EngineModel:
    """One model as the engine's ``/v1/models`` lists it (``meta`` as llama.cpp's server adds)."""

    id: str
    created_ns: int = 0
    size: int = 0
    n_params: int = 0
    n_ctx_train: int = 0

    @property
    def name(self) -> str:
        return ollama_name(self.id)


def engine_models(listing: Any, now_ns: int, first_seen: dict[str, int] | None = None) -> list[EngineModel]:
    """The models in an OpenAI ``/v1/models`` answer. Where the engine gives no creation time, the
    time a model was first seen stands for it (``first_seen``, kept by the caller, is updated)."""
    seen = {} if first_seen is None else first_seen
    data = listing.get("data") if isinstance(listing, dict) else None
    out: list[EngineModel] = []
    for item in data if isinstance(data, list) else []:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not item["id"]:
            continue
        meta: dict[str, Any] = item["meta"] if isinstance(item.get("meta"), dict) else {}
        created = _count(item.get("created"))
        out.append(
            EngineModel(
                id=item["id"],
                created_ns=created * 1_000_000_000 if created else seen.setdefault(item["id"], now_ns),
                size=_count(meta.get("size")),
                n_params=_count(meta.get("n_params")),
                n_ctx_train=_count(meta.get("n_ctx_train")),
            )
        )
    return out


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def ollama_name(model_id: str) -> str:
    """The name Ollama would list: with its tag, ``:latest`` when the id has none."""
    return model_id if ":" in model_id.rsplit("/", 1)[-1] else model_id + ":latest"


def find_model(name: str, models: Iterable[EngineModel]) -> EngineModel | None:
    """The engine's model a client names: its id, or its Ollama name (``tiny``, ``tiny:latest``);
    names compare without case, as Ollama's do."""
    want = name.strip().casefold()
    if not want:
        return None
    for m in models:
        if want in (m.id.casefold(), m.name.casefold()):
            return m
    return None


def _require_model(name: Any, models: Sequence[EngineModel], status: int, empty_message: str) -> EngineModel:
    if not isinstance(name, str) or not name:
        raise RequestRefused(status, empty_message)
    found = find_model(name, models)
    if found is None:
        raise RequestRefused(404, f"model '{name}' not found")
    return found


def _details(m: EngineModel) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf" if m.n_params else "",
        "family": "",
        "families": None,
        "parameter_size": human_number(m.n_params) if m.n_params else "",
        "quantization_level": "",
    }


def _digest(m: EngineModel) -> str:
    return hashlib.sha256(m.id.encode()).hexdigest()


def tags_answer(models: Sequence[EngineModel]) -> dict[str, Any]:
    """``GET /api/tags``."""
    return {
        "models": [
            {
                "name": m.name,
                "model": m.name,
                "modified_at": rfc3339(m.created_ns),
                "size": m.size,
                "digest": _digest(m),
                "details": _details(m),
            }
            for m in models
        ]
    }


def ps_answer(models: Sequence[EngineModel], wall_ns: int) -> dict[str, Any]:
    """``GET /api/ps``: the engine keeps its models loaded, so all are listed, expiring "for ever"
    (what Ollama shows for ``keep_alive: -1``); the memory on the GPU is not known (0)."""
    expires = rfc3339(min(wall_ns + FOREVER_NS, 253402300799 * 1_000_000_000))
    return {
        "models": [
            {
                "name": m.name,
                "model": m.name,
                "size": m.size,
                "digest": _digest(m),
                "details": _details(m),
                "expires_at": expires,
                "size_vram": 0,
                "context_length": m.n_ctx_train,
            }
            for m in models
        ]
    }


def show_answer(req: dict[str, Any], models: Sequence[EngineModel]) -> dict[str, Any]:
    """``POST /api/show``: what is known of the model (``model_info`` is never left out: the Python
    client requires it)."""
    name = _typed(req, "model", str, "string") or _typed(req, "name", str, "string")
    if not name:
        raise RequestRefused(400, "model is required")
    m = _require_model(name, models, 400, "model is required")
    info: dict[str, Any] = {}
    if m.n_params:
        info["general.parameter_count"] = m.n_params
    if m.n_ctx_train:
        info["general.context_length"] = m.n_ctx_train
    return {
        "modelfile": (
            f"# Served by kaggle-bridge: Ollama's API in front of an OpenAI-compatible engine\nFROM {m.id}\n"
        ),
        "parameters": "",
        "template": "",
        "details": _details(m),
        "model_info": info,
        "capabilities": ["completion"],
        "modified_at": rfc3339(m.created_ns),
    }


def version_answer() -> dict[str, Any]:
    """``GET /api/version``."""
    return {"version": OLLAMA_VERSION}


# ---------------------------------------------------------------------------------- generation
@dataclass(slots=True)
class Generation:
    """A chat or generate request, translated. ``body`` is the OpenAI request for ``path``;
    ``answer`` is ``"load"`` or ``"unload"`` when Ollama answers at once without generating."""

    kind: Literal["chat", "generate"]
    model: str  # as the client named it: every answer echoes it
    stream: bool
    path: str = "/v1/chat/completions"
    body: dict[str, Any] = field(default_factory=dict)
    answer: str = ""


def map_options(options: Any) -> dict[str, Any]:
    """Ollama's ``options`` checked as Ollama's ``Options.FromMap`` does, and those that reach the
    engine renamed. Unknown options are ignored (Ollama logs and ignores them). A value of the wrong
    kind is 400 (Ollama answers 500 for it: it is the client's mistake, so 400 here)."""
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise RequestRefused(
            400, f"json: cannot unmarshal {_go_kind(options)} into Go struct field .options of type map"
        )
    out: dict[str, Any] = {}
    for key, value in options.items():
        kind = OPTION_KINDS.get(key)
        if kind is None or value is None:
            continue
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "integer":
            if not number:
                raise RequestRefused(400, f'option "{key}" must be of type integer')
            value = int(value)
        elif kind == "float32":
            if not number:
                raise RequestRefused(400, f'option "{key}" must be of type float32')
            value = float(value)
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise RequestRefused(400, f'option "{key}" must be of type boolean')
        elif kind == "array":
            if not isinstance(value, list):
                raise RequestRefused(400, f'option "{key}" must be of type array')
            if not all(isinstance(s, str) for s in value):
                raise RequestRefused(400, f'option "{key}" must be of an array of strings')
        target = OPTION_FIELDS.get(key)
        if target is None:
            continue  # fixed when the engine loaded the model
        if key == "num_predict" and value <= 0:
            continue  # -1: no limit, -2: fill the context; the engine's default is no limit
        if key == "seed" and value < 0:
            continue  # -1: a random seed
        if key == "stop" and not value:
            continue
        out[target] = value
    return out


def check_think(value: Any, model: str) -> bool | None:
    """``think`` for a model without thinking, as Ollama answers: absent or false pass (returned),
    true or a level is 400 ``"<model>" does not support thinking``."""
    if value is None:
        return None
    if value is False:
        return False
    if value is True or value in _THINK_LEVELS:
        raise RequestRefused(400, f"{json.dumps(model)} does not support thinking")
    if isinstance(value, str):
        raise RequestRefused(
            400, f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)'
        )
    raise RequestRefused(
        400, 'think must be a boolean or string ("high", "medium", "low", "max", true, or false)'
    )


def response_format(fmt: Any) -> dict[str, Any] | None:
    """``format`` as an OpenAI ``response_format`` in the form llama.cpp's servers take."""
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return {"type": "json_object"}
    if isinstance(fmt, dict):
        return {"type": "json_object", "schema": fmt}
    raise RequestRefused(
        400, f'invalid format: {json.dumps(json.dumps(fmt))}; expected "json" or a valid JSON Schema object'
    )


def _image_part(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, str):
        raise RequestRefused(400, f"{where}: an image must be a base64 string")
    try:
        head = base64.b64decode(data[:24] + "=" * (-len(data[:24]) % 4), validate=True)
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRefused(400, f"{where}: illegal base64 data in an image") from None
    mime = "image/jpeg"  # what Ollama sends when it cannot tell (llm/llama_server.go)
    if head.startswith(b"\x89PNG"):
        mime = "image/png"
    elif head.startswith(b"GIF8"):
        mime = "image/gif"
    elif head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        mime = "image/webp"
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}


def _message(m: Any, i: int) -> dict[str, Any]:
    """One Ollama chat message as an OpenAI one (llm/llama_server.go ``llamaServerChatMessage``)."""
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise RequestRefused(400, f"json: cannot unmarshal {_go_kind(m)} into Go struct field {where}")
    role = _typed(m, "role", str, "string") or ""
    content = _typed(m, "content", str, "string") or ""
    out: dict[str, Any] = {"role": role.lower()}
    if tool_call_id := _typed(m, "tool_call_id", str, "string"):
        out["tool_call_id"] = tool_call_id
    if tool_name := _typed(m, "tool_name", str, "string"):
        out["name"] = tool_name
    calls = _typed(m, "tool_calls", list, "[]api.ToolCall")
    if calls:
        out["tool_calls"] = [_tool_call_out(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    images = _typed(m, "images", list, "[]api.ImageData")
    if images:
        parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if content else []
        parts += [_image_part(img, where) for img in images]
        out["content"] = parts
    else:
        out["content"] = content
    return out


def _tool_call_out(call: Any, where: str) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestRefused(400, f"{where}: a tool call needs function.name")
    args = fn.get("arguments")
    out: dict[str, Any] = {
        "type": "function",
        "function": {"name": fn["name"], "arguments": json.dumps(args if args is not None else {})},
    }
    if isinstance(call.get("id"), str) and call["id"]:
        out["id"] = call["id"]
    return out


def _stream_flag(req: dict[str, Any]) -> bool:
    stream = _typed(req, "stream", bool, "bool")
    return True if stream is None else bool(stream)


def _check_logprobs(req: dict[str, Any]) -> None:
    top = _typed(req, "top_logprobs", int, "int")
    if top is not None and not 0 <= top <= 20:
        raise RequestRefused(400, "top_logprobs must be between 0 and 20")


def _common(req: dict[str, Any], model: str) -> tuple[dict[str, Any], bool | None]:
    """Options, format and think, shared by chat and generate, checked in Ollama's order."""
    think = check_think(req.get("think"), model)
    body: dict[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}
    body.update(map_options(req.get("options")))
    fmt = response_format(req.get("format"))
    if fmt is not None:
        body["response_format"] = fmt
    return body, think


def chat_request(req: dict[str, Any], models: Sequence[EngineModel]) -> Generation:
    """``POST /api/chat`` as an OpenAI chat completion (always streamed from the engine: the
    counters need the tokens' times, and ``"stream": false`` is gathered here)."""
    _check_logprobs(req)
    name = req.get("model")
    if not isinstance(name, str) or not name:
        raise RequestRefused(400, "model is required")
    engine = _require_model(name, models, 400, "model is required")
    stream = _stream_flag(req)
    keep_alive = parse_keep_alive(req.get("keep_alive"))
    messages = _typed(req, "messages", list, "[]api.Message") or []
    converted = [_message(m, i) for i, m in enumerate(messages)]
    if not converted and keep_alive == 0:
        return Generation("chat", name, stream, answer="unload")
    body, think = _common(req, name)
    if not converted:
        return Generation("chat", name, stream, answer="load")
    tools = _typed(req, "tools", list, "api.Tools")
    if tools:
        if not all(isinstance(t, dict) for t in tools):
            raise RequestRefused(400, "json: cannot unmarshal into Go struct field ChatRequest.tools")
        body["tools"] = tools
    if think is False:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return Generation("chat", name, stream, body={"model": engine.id, "messages": converted, **body})


def generate_request(req: dict[str, Any], models: Sequence[EngineModel]) -> Generation:
    """``POST /api/generate``: the prompt as one user message (and ``system``) on the engine's chat
    template, as Ollama renders it with the model's; ``raw`` and ``suffix`` go to ``/v1/completions``."""
    _check_logprobs(req)
    name = req.get("model")
    if not isinstance(name, str) or not name:
        raise RequestRefused(404, f"model '{name or ''}' not found")
    engine = _require_model(name, models, 404, f"model '{name}' not found")
    stream = _stream_flag(req)
    keep_alive = parse_keep_alive(req.get("keep_alive"))
    prompt = _typed(req, "prompt", str, "string") or ""
    if not prompt and keep_alive == 0:
        return Generation("generate", name, stream, answer="unload")
    raw = bool(_typed(req, "raw", bool, "bool"))
    system = _typed(req, "system", str, "string") or ""
    template = _typed(req, "template", str, "string") or ""
    suffix = _typed(req, "suffix", str, "string") or ""
    if raw and (template or system or req.get("context")):
        raise RequestRefused(400, "raw mode does not support template, system, or context")
    if template:
        raise RequestRefused(
            400, "template is not supported here: the engine formats prompts with its own chat template"
        )
    images = _typed(req, "images", list, "[]api.ImageData") or []
    body, think = _common(req, name)
    if not prompt:
        return Generation("generate", name, stream, answer="load")
    if raw or suffix:
        if images:
            raise RequestRefused(400, "images need the chat template: not with raw or suffix here")
        body.update(model=engine.id, prompt=prompt)
        if suffix:
            body["suffix"] = suffix
        return Generation("generate", name, stream, path="/v1/completions", body=body)
    user: dict[str, Any] = {"role": "user", "content": prompt}
    if images:
        user["images"] = images
    messages = ([{"role": "system", "content": system}] if system else []) + [_message(user, 0)]
    if think is False:
        body["chat_template_kwargs"] = {"enable_thinking": False}
    return Generation("generate", name, stream, body={"model": engine.id, "messages": messages, **body})


def immediate_answer(gen: Generation, wall_ns: int) -> dict[str, Any]:
    """Ollama's answer to a request with nothing to generate: ``done_reason`` ``load``/``unload``."""
    out: dict[str, Any] = {"model": gen.model, "created_at": rfc3339(wall_ns)}
    if gen.kind == "chat":
        out["message"] = {"role": "assistant", "content": ""}
    else:
        out["response"] = ""
    out.update(done=True, done_reason=gen.answer)
    return out


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
                event = _DECODE(payload.decode())
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
            answer = _DECODE(data.decode())
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
                if (n := _count(usage.get(key))) or usage.get(key) == 0:
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
        text = _ENCODE(content).encode()
        extra = b',"thinking":' + _ENCODE(thinking).encode() if thinking else b""
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


# ---------------------------------------------------------------------------------- embeddings
@dataclass(slots=True)
class Embedding:
    """An ``/api/embed`` (``legacy``: ``/api/embeddings``) request, translated."""

    model: str
    inputs: list[str]
    legacy: bool = False
    dimensions: int = 0
    body: dict[str, Any] = field(default_factory=dict)


def embed_request(req: dict[str, Any], models: Sequence[EngineModel]) -> Embedding:
    """``POST /api/embed``: ``input`` a string or a list of strings (server/routes.go ``EmbedHandler``)."""
    name = req.get("model")
    if not isinstance(name, str) or not name:
        raise RequestRefused(404, f"model '{name or ''}' not found")
    raw = req.get("input")
    inputs: list[str] = []
    if isinstance(raw, str):
        inputs = [raw] if raw else []
    elif isinstance(raw, list):
        if not all(isinstance(s, str) for s in raw):
            raise RequestRefused(400, "invalid input type")
        inputs = list(raw)
    elif raw is not None:
        raise RequestRefused(400, "invalid input type")
    engine = _require_model(name, models, 404, f"model '{name}' not found")
    parse_keep_alive(req.get("keep_alive"))
    map_options(req.get("options"))
    _typed(req, "truncate", bool, "bool")  # the engine truncates, or refuses, by its own rule
    dims = _typed(req, "dimensions", int, "int") or 0
    return Embedding(name, inputs, dimensions=max(0, dims), body={"model": engine.id, "input": inputs})


def embeddings_request(req: dict[str, Any], models: Sequence[EngineModel]) -> Embedding:
    """``POST /api/embeddings`` (the older API): one ``prompt``, one raw (not normalised) vector."""
    name = req.get("model")
    if not isinstance(name, str) or not name:
        raise RequestRefused(400, "model is required")
    engine = _require_model(name, models, 400, "model is required")
    parse_keep_alive(req.get("keep_alive"))
    map_options(req.get("options"))
    prompt = _typed(req, "prompt", str, "string") or ""
    inputs = [prompt] if prompt else []
    return Embedding(name, inputs, legacy=True, body={"model": engine.id, "input": inputs})


def _pooled(vector: Any) -> list[float]:
    """One vector per input: llama-cpp-python answers one vector per token for a model without
    pooling; those are averaged (llama.cpp's mean pooling)."""
    if isinstance(vector, list) and vector and isinstance(vector[0], list):
        width = len(vector[0])
        rows = [row for row in vector if isinstance(row, list) and len(row) == width]
        return [sum(col) / len(rows) for col in zip(*rows, strict=True)]
    if not isinstance(vector, list) or not all(isinstance(v, int | float) for v in vector):
        raise RequestRefused(500, "the engine answered an embedding that is not a list of numbers")
    return [float(v) for v in vector]


def _normalised(vector: list[float]) -> list[float]:
    """Ollama's ``normalize`` (server/routes.go): unit length; NaN or infinity is an error."""
    total = 0.0
    for v in vector:
        if math.isnan(v) or math.isinf(v):
            raise RequestRefused(500, "embedding contains NaN or Inf values")
        total += v * v
    scale = 1.0 / max(math.sqrt(total), 1e-12)
    return [v * scale for v in vector]


def embed_answer(plan: Embedding, engine: Any, total_ns: int, load_ns: int) -> dict[str, Any]:
    """The engine's ``/v1/embeddings`` answer as Ollama's (``/api/embed``: normalised, cut to
    ``dimensions`` and normalised again, as Ollama does; ``/api/embeddings``: the raw vector)."""
    data = engine.get("data") if isinstance(engine, dict) else None
    if not isinstance(data, list) or len(data) != len(plan.inputs):
        raise RequestRefused(500, "the engine's embeddings answer does not match the request")
    items = sorted(
        (d for d in data if isinstance(d, dict)),
        key=lambda d: d.get("index", 0) if isinstance(d.get("index"), int) else 0,
    )
    vectors = [_pooled(d.get("embedding")) for d in items]
    if plan.legacy:
        return {"embedding": vectors[0] if vectors else []}
    out_vectors = []
    for v in vectors:
        v = _normalised(v)
        if 0 < plan.dimensions < len(v):
            v = _normalised(v[: plan.dimensions])
        out_vectors.append(v)
    answer: dict[str, Any] = {"model": plan.model, "embeddings": out_vectors}
    usage = engine.get("usage") if isinstance(engine, dict) else None
    counters = {"total_duration": total_ns, "load_duration": load_ns}
    if isinstance(usage, dict) and _count(usage.get("prompt_tokens")):
        counters["prompt_eval_count"] = usage["prompt_tokens"]
    answer.update({k: v for k, v in counters.items() if v > 0})
    return answer


def empty_embed_answer(plan: Embedding) -> dict[str, Any]:
    """An embed request with no input: answered without the engine, as Ollama does."""
    return {"embedding": []} if plan.legacy else {"model": plan.model, "embeddings": []}
