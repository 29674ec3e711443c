"""``/api/embed`` and ``/api/embeddings`` on the engine's ``/v1/embeddings``. No I/O."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import RequestRefused
from .generation import map_options
from .models import EngineModel, require_model
from .values import count, parse_keep_alive, typed


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
    engine = require_model(name, models, 404, f"model '{name}' not found")
    parse_keep_alive(req.get("keep_alive"))
    map_options(req.get("options"))
    typed(req, "truncate", bool, "bool")  # the engine truncates, or refuses, by its own rule
    dims = typed(req, "dimensions", int, "int") or 0
    return Embedding(name, inputs, dimensions=max(0, dims), body={"model": engine.id, "input": inputs})


def embeddings_request(req: dict[str, Any], models: Sequence[EngineModel]) -> Embedding:
    """``POST /api/embeddings`` (the older API): one ``prompt``, one raw (not normalised) vector."""
    name = req.get("model")
    if not isinstance(name, str) or not name:
        raise RequestRefused(400, "model is required")
    engine = require_model(name, models, 400, "model is required")
    parse_keep_alive(req.get("keep_alive"))
    map_options(req.get("options"))
    prompt = typed(req, "prompt", str, "string") or ""
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
    if isinstance(usage, dict) and count(usage.get("prompt_tokens")):
        counters["prompt_eval_count"] = usage["prompt_tokens"]
    answer.update({k: v for k, v in counters.items() if v > 0})
    return answer


def empty_embed_answer(plan: Embedding) -> dict[str, Any]:
    """An embed request with no input: answered without the engine, as Ollama does."""
    return {"embedding": []} if plan.legacy else {"model": plan.model, "embeddings": []}
