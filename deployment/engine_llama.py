"""What the embedded engine's server (``deployment/engine_server.py``) does to the loaded
``llama_cpp.Llama`` and the usage it reports: a prompt cache of KV states only (:func:`lean_scores`),
the engine's own token counts and times of each generation (:func:`count_tokens`, :data:`USAGE`),
OpenAI's ``stream_options.include_usage`` chunk (:func:`wants_usage`, :func:`usage_event`) and
llama-server's ``meta`` of the model (:func:`model_meta`). Why each, and what was checked where, is in
``engine_server``'s docstring. Standard library only (llama-cpp-python is imported where needed)."""

from __future__ import annotations

import contextvars
import json
import time
from collections.abc import Callable
from typing import Any


# ----------------------------------------------------------------------------------- prompt cache
def lean_scores(llm: Any) -> bool:
    """Shrink a ``llama_cpp.Llama``'s logits array to one row when nothing reads it (no
    ``logits_all``): what its prompt cache copies into every state (see the module's docstring).
    True when it did. ``load_state`` assigns a state's rows to ``scores[:n_tokens]``, which a one-row
    array takes (numpy broadcasting); checked in llama_cpp/llama.py 0.3.36 (``eval``,
    ``save_state``, ``load_state``, ``_create_completion``)."""
    scores = getattr(llm, "scores", None)
    if getattr(llm, "_logits_all", True) or scores is None or scores.shape[0] <= 1:
        return False
    llm.scores = scores[:1].copy()
    return True


# ----------------------------------------------------------------------------------- usage
#: The counts of the request being served, where it asked for them: set by :class:`Gate` around
#: the request, filled by :func:`count_tokens` in the worker thread (starlette runs the model with
#: anyio's ``to_thread.run_sync``, which runs it in a copy of the request's context: the same dict).
USAGE: contextvars.ContextVar[dict[str, float] | None] = contextvars.ContextVar("usage", default=None)


def count_tokens(llm: Any, is_end: Callable[[int], bool] | None = None) -> None:
    """Make ``llm`` (a ``llama_cpp.Llama``) count each generation's prompt and completion tokens
    and time them, into :data:`USAGE` when a request set it. ``is_end``: whether a token ends the
    generation (llama.cpp's ``llama_vocab_is_eog``); such a token is not a completion token."""
    original = llm.generate
    if is_end is None:
        import llama_cpp

        vocab = llm._model.vocab
        is_end = lambda token: bool(llama_cpp.llama_vocab_is_eog(vocab, token))  # noqa: E731
    end = is_end

    def generate(tokens: Any, *args: Any, **kwargs: Any) -> Any:
        record = USAGE.get()
        inner = original(tokens, *args, **kwargs)
        if record is None:
            return (yield from inner)
        prompt = list(tokens)
        record.update(prompt_tokens=len(prompt), completion_tokens=0)
        started = time.perf_counter()
        first = 0.0
        reply = None
        try:
            while True:
                try:
                    token = inner.send(reply)
                except StopIteration:
                    return None
                now = time.perf_counter()
                if not first:
                    first = now
                    record["prompt_ms"] = (now - started) * 1e3
                if not end(token):
                    record["completion_tokens"] += 1
                    record["predicted_ms"] = (now - first) * 1e3
                reply = yield token
        finally:
            inner.close()

    llm.generate = generate


def wants_usage(body: bytes) -> bool:
    """Whether a request body asks for a streamed answer with ``stream_options.include_usage``."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(req, dict) or req.get("stream") is not True:
        return False
    options = req.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def usage_event(last: bytes, record: dict[str, float]) -> bytes:
    """The usage chunk (server-sent event) after ``last``, the stream's last ``data:`` event (its
    ``id``, ``object``, ``created`` and ``model`` are repeated)."""
    at = last.rfind(b"data: {")
    try:
        head = json.loads(last[at + 5 :].split(b"\n", 1)[0]) if at >= 0 else {}
    except ValueError:
        head = {}
    if not isinstance(head, dict):
        head = {}
    prompt = int(record.get("prompt_tokens", 0))
    completion = int(record.get("completion_tokens", 0))
    chunk: dict[str, Any] = {k: head[k] for k in ("id", "object", "created", "model") if k in head}
    chunk["choices"] = []
    chunk["usage"] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    timings = {
        "prompt_ms": record.get("prompt_ms"),
        "predicted_n": completion,
        "predicted_ms": record.get("predicted_ms"),
    }
    chunk["timings"] = {k: round(v, 3) for k, v in timings.items() if v is not None}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def model_meta(llm: Any) -> dict[str, int]:
    """What llama.cpp's own ``llama-server`` lists under ``meta`` in ``/v1/models`` (its
    ``model_meta()``: ``vocab_type``, ``n_vocab``, ``n_ctx_train``, ``n_embd``, ``n_params``,
    ``size`` in bytes), read from the loaded model through llama-cpp-python 0.3.36's ``_model``
    (``LlamaModel.n_params()``/``size()``/...). The bridge's Ollama API fills ``/api/show``'s and
    ``/api/tags``' ``parameter_size`` and ``size`` from it (bridge/ollama/models.py)."""
    model = llm._model
    return {
        "vocab_type": int(model.vocab_type()),
        "n_vocab": int(model.n_vocab()),
        "n_ctx_train": int(model.n_ctx_train()),
        "n_embd": int(model.n_embd()),
        "n_params": int(model.n_params()),
        "size": int(model.size()),
    }
