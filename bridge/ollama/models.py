"""The engine's models as Ollama lists them: ``/v1/models`` read, and the answers of ``/api/tags``,
``/api/ps``, ``/api/show`` and ``/api/version``. No I/O."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import RequestRefused
from .values import FOREVER_NS, OLLAMA_VERSION, SERVED_BY, count, human_number, rfc3339, typed


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
        created = count(item.get("created"))
        out.append(
            EngineModel(
                id=item["id"],
                created_ns=created * 1_000_000_000 if created else seen.setdefault(item["id"], now_ns),
                size=count(meta.get("size")),
                n_params=count(meta.get("n_params")),
                n_ctx_train=count(meta.get("n_ctx_train")),
            )
        )
    return out


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


def require_model(name: Any, models: Sequence[EngineModel], status: int, empty_message: str) -> EngineModel:
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
    name = typed(req, "model", str, "string") or typed(req, "name", str, "string")
    if not name:
        raise RequestRefused(400, "model is required")
    m = require_model(name, models, 400, "model is required")
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
    """``GET /api/version``: the Ollama version whose API this follows, and ``served_by``
    (:data:`~.values.SERVED_BY`), which a real Ollama does not send."""
    return {"version": OLLAMA_VERSION, "served_by": SERVED_BY}
