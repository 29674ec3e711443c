"""``/api/chat`` and ``/api/generate`` as OpenAI requests: options, ``think``, ``format``,
messages and images checked as Ollama does, and the engine's request built. No I/O."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import RequestRefused
from .models import EngineModel, require_model
from .values import go_kind, parse_keep_alive, rfc3339, typed

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
            400, f"json: cannot unmarshal {go_kind(options)} into Go struct field .options of type map"
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
        raise RequestRefused(400, f"json: cannot unmarshal {go_kind(m)} into Go struct field {where}")
    role = typed(m, "role", str, "string") or ""
    content = typed(m, "content", str, "string") or ""
    out: dict[str, Any] = {"role": role.lower()}
    if tool_call_id := typed(m, "tool_call_id", str, "string"):
        out["tool_call_id"] = tool_call_id
    if tool_name := typed(m, "tool_name", str, "string"):
        out["name"] = tool_name
    calls = typed(m, "tool_calls", list, "[]api.ToolCall")
    if calls:
        out["tool_calls"] = [_tool_call_out(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    images = typed(m, "images", list, "[]api.ImageData")
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
    stream = typed(req, "stream", bool, "bool")
    return True if stream is None else bool(stream)


def _check_logprobs(req: dict[str, Any]) -> None:
    top = typed(req, "top_logprobs", int, "int")
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
    engine = require_model(name, models, 400, "model is required")
    stream = _stream_flag(req)
    keep_alive = parse_keep_alive(req.get("keep_alive"))
    messages = typed(req, "messages", list, "[]api.Message") or []
    converted = [_message(m, i) for i, m in enumerate(messages)]
    if not converted and keep_alive == 0:
        return Generation("chat", name, stream, answer="unload")
    body, think = _common(req, name)
    if not converted:
        return Generation("chat", name, stream, answer="load")
    tools = typed(req, "tools", list, "api.Tools")
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
    engine = require_model(name, models, 404, f"model '{name}' not found")
    stream = _stream_flag(req)
    keep_alive = parse_keep_alive(req.get("keep_alive"))
    prompt = typed(req, "prompt", str, "string") or ""
    if not prompt and keep_alive == 0:
        return Generation("generate", name, stream, answer="unload")
    raw = bool(typed(req, "raw", bool, "bool"))
    system = typed(req, "system", str, "string") or ""
    template = typed(req, "template", str, "string") or ""
    suffix = typed(req, "suffix", str, "string") or ""
    if raw and (template or system or req.get("context")):
        raise RequestRefused(400, "raw mode does not support template, system, or context")
    if template:
        raise RequestRefused(
            400, "template is not supported here: the engine formats prompts with its own chat template"
        )
    images = typed(req, "images", list, "[]api.ImageData") or []
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
