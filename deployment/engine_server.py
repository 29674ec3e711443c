"""The embedded engine's server process: llama-cpp-python's OpenAI-compatible server
(``llama_cpp.server`` 0.3.36) with what a supervised, shared service needs and the stock server lacks.
``deployment/engine.py`` starts it (``EmbeddedEngine.command()``); run by path, it needs only
llama-cpp-python[server] and the standard library::

    python deployment/engine_server.py [--max-queue N] [--hang-after S] <llama_cpp.server flags>

What the stock server does (read in llama_cpp/server/app.py, 0.3.36): every endpoint that touches
the model (``/v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings``, ``/v1/models``,
``/extras/*``) depends on ``get_llama_proxy``, which takes two ``anyio.Lock``s in turn
(``llama_outer_lock``, then ``llama_inner_lock``, held until the response is complete, the whole
stream included). So requests run one at a time, the rest wait in the lock's FIFO queue without
bound, and even ``GET /v1/models`` waits behind a 20-second prefill: a health check on it cannot
tell a busy engine from a dead one. The model runs in a worker thread (``run_in_threadpool``), and
llama.cpp's ``llama_decode`` releases the GIL, so the event loop stays free while it computes.

What this adds, in :class:`Gate` (an ASGI wrapper around the stock app; nothing of it is patched)
and, for what it does to the loaded model, in ``deployment/engine_llama.py``:

- ``GET /health`` answered by the event loop without the model's lock: 200 with ``status`` ``ok``
  (idle) or ``busy`` (requests running or waiting, and the inference threads burn CPU), and 503 with
  ``status`` ``hung`` when a request holds the model but no thread other than the event loop's has
  used any CPU for ``--hang-after`` seconds (and the engine is not merely waiting for a client to read
  its stream). Progress is CPU time from ``/proc/self/task`` (Linux): a long prefill is one
  ``llama_decode`` call of up to ``n_batch`` tokens, so counting finished calls would call a slow
  machine hung; CPU time moves all through it.
- ``GET /v1/models`` answered the same way (the list is fixed at start), so the bridge and Open
  WebUI see the model while it generates.
- A bounded queue: with ``--max-queue N`` requests running or waiting for the model, the next one
  gets 503 at once, with ``Retry-After`` (the recent time between two finished requests, rounded
  up: when a place is likely to be free) and an OpenAI-shaped error body, instead of waiting in an
  unbounded queue. 0: no bound.
- A chat format for base models (:data:`DIALOGUE_FORMAT`, registered with llama-cpp-python and
  chosen with ``--chat_format``): the Gemma 3 270M base model from PyPI has no chat template, and
  Gemma's own turn markers make it repeat the question (``benchmarks/prompt_formats.py`` measures the
  candidates).
- A client's ``X-Request-Id`` that is not a UUID is passed along instead of answered with 400
  (starlette-context's check in the stock server): proxies in front of the relay send ids of any shape.
- A prompt cache that holds KV states only (``--cache True``, which ``EmbeddedEngine`` passes for
  ``prompt_cache_mib``): the stock ``LlamaRAMCache`` keeps, with each state, a copy of the model's
  logits array (``Llama.save_state`` copies ``scores[:n_tokens]``: up to ``n_batch x n_vocab`` floats,
  512 MiB for Gemma's 262,144-token vocabulary) that its ``cache_size`` does not count, so a
  256 MiB cache grew the engine past 4 GB in a few chats. Without ``logits_all`` (the server's
  default) llama-cpp-python never reads those logits (sampling happens in llama.cpp's sampler;
  logprobs need ``logits_all``), so :func:`lean_scores` shrinks the array to one row: a state then
  costs its KV cells (18 KiB a token on Gemma 3 270M) and one row, and saving or restoring one copies
  megabytes, not hundreds.
- OpenAI's ``stream_options: {"include_usage": true}`` on streamed ``/v1/chat/completions`` and
  ``/v1/completions`` (llama-cpp-python 0.3.36 has no ``stream_options`` at all: its request models
  ignore the field and its streams carry no ``usage``): one more chunk before ``data: [DONE]``, with
  ``choices: []`` and ``usage`` ``{prompt_tokens, completion_tokens, total_tokens}``, as OpenAI's API
  reference describes it; vLLM does the same (``StreamOptions`` in its ``protocol.py``: "an additional
  chunk ... before the ``data: [DONE]`` message ... the ``choices`` field will always be an empty
  array"), and llama.cpp's ``llama-server`` sends its ``usage`` with ``timings``
  (``prompt_ms``, ``predicted_n``, ``predicted_ms``) on its last chunk: checked with code search on
  both projects' sources. The counts are the engine's own: :func:`count_tokens` wraps the loaded
  ``Llama``'s ``generate`` (the one instance, not the class), which ``_create_completion`` calls
  with the tokenized prompt (so ``prompt_tokens`` equals the ``usage.prompt_tokens`` of the same
  request not streamed, ``len(prompt_tokens)`` there) and whose tokens it counts as
  ``completion_tokens`` (all but an end-of-generation token, as ``_create_completion`` does). The
  usage chunk also carries ``timings`` with ``prompt_ms`` (from the call to the first token: the
  prompt's evaluation and the first sample), ``predicted_n`` and ``predicted_ms`` (first token to
  last), llama-server's names; no ``prompt_n``, whose meaning there (tokens not found in the cache)
  this does not measure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

if __package__ in (None, ""):  # run by path (python deployment/engine_server.py): find the package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from deployment.engine_llama import (
    USAGE,
    count_tokens,
    lean_scores,
    model_meta,
    usage_event,
    wants_usage,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

DEFAULT_MAX_QUEUE = 16
DEFAULT_HANG_AFTER = 60.0

#: Paths whose requests wait for the model (the stock server's, see the module's docstring).
MODEL_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/engines/copilot-codex/completions"}
)
#: Paths whose streams honour ``stream_options.include_usage``.
GENERATION_PATHS = MODEL_PATHS - {"/v1/embeddings"}
#: The largest request body read to look for ``stream_options`` (bigger ones pass unread).
MAX_PEEK = 16 << 20

# ----------------------------------------------------------------------------------- chat format
#: The name under which :func:`register_chat_formats` registers :func:`format_dialogue`.
DIALOGUE_FORMAT = "dialogue"
DIALOGUE_SYSTEM = "A conversation between a user and a helpful assistant."
#: Two example turns: a base model continues a pattern, and these show it short, direct answers
#: that end where the next ``User:`` line would start (the stop string).
DIALOGUE_EXAMPLES = (
    ("What colour is grass?", "Grass is green."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
)
DIALOGUE_STOP = ["\nUser:"]
#: The examples go only into chats shorter than this (characters): after a long document in the
#: user's turn the 270M model copies the nearest example answer instead of answering (measured with
#: benchmarks/prompt_formats.py on the validation suite's 1,700-token prompts), while without them it
#: answers from the document.
DIALOGUE_EXAMPLES_UP_TO = 2000


def _text(content: Any) -> str:
    """A message's text: a string, or OpenAI's list of parts (only the text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def format_dialogue(messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The prompt and stop strings for a chat on a base (not instruction-tuned) model: a plain
    ``User:`` / ``Assistant:`` transcript after a one-line system text (the request's system
    messages, else :data:`DIALOGUE_SYSTEM`) and, in short chats, :data:`DIALOGUE_EXAMPLES`, ending
    with ``Assistant:`` for the model to continue."""
    system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") == "system").strip()
    lines = [system or DIALOGUE_SYSTEM, ""]
    if sum(len(_text(m.get("content"))) for m in messages) < DIALOGUE_EXAMPLES_UP_TO:
        for question, answer in DIALOGUE_EXAMPLES:
            lines += [f"User: {question}", f"Assistant: {answer}"]
    for m in messages:
        role = m.get("role")
        if role == "system":
            continue
        name = "Assistant" if role == "assistant" else "User"
        lines.append(f"{name}: {_text(m.get('content')).strip()}")
    lines.append("Assistant:")
    return "\n".join(lines), list(DIALOGUE_STOP)


def register_chat_formats() -> None:
    """Register :data:`DIALOGUE_FORMAT` with llama-cpp-python (``--chat_format dialogue``)."""
    from llama_cpp import llama_chat_format as lcf

    def dialogue(messages: list[Any], **_: Any) -> Any:
        prompt, stop = format_dialogue(messages)
        return lcf.ChatFormatterResponse(prompt=prompt, stop=stop)

    lcf.register_chat_format(DIALOGUE_FORMAT)(dialogue)


async def _read_body(receive: Receive) -> tuple[list[Message], bytes]:
    """The request's messages up to the end of its body (or :data:`MAX_PEEK` bytes), and the body."""
    messages: list[Message] = []
    body = b""
    while True:
        message = await receive()
        messages.append(message)
        if message["type"] != "http.request":
            break
        body += message.get("body", b"")
        if not message.get("more_body", False) or len(body) > MAX_PEEK:
            break
    return messages, body


# ----------------------------------------------------------------------------------- progress
def _tick() -> float:
    try:
        return 1.0 / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError, AttributeError):
        return 0.01


class InferenceCpu:
    """CPU seconds used so far by this process's threads other than ``main_tid`` (the event loop's):
    the model's worker thread and llama.cpp's own. None where ``/proc`` is not there."""

    def __init__(self, main_tid: int) -> None:
        self.main_tid = main_tid
        self.tick = _tick()

    def __call__(self) -> float | None:
        total = 0
        try:
            tids = os.listdir("/proc/self/task")
        except OSError:
            return None
        for tid in tids:
            if tid == str(self.main_tid):
                continue
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
            except OSError:  # the thread ended meanwhile
                continue
            rest = stat[stat.rfind(")") + 2 :].split()
            total += int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)
        return total * self.tick


# ----------------------------------------------------------------------------------- the gate
class Gate:
    """ASGI wrapper: health, model list, bounded queue (see the module's docstring).

    ``model_busy()`` says whether a request holds the model (the stock server's inner lock);
    ``cpu()`` is :class:`InferenceCpu`; ``clock`` is injectable for tests."""

    def __init__(
        self,
        app: App,
        *,
        models: list[str],
        model_busy: Callable[[], bool],
        cpu: Callable[[], float | None],
        max_queue: int = DEFAULT_MAX_QUEUE,
        hang_after: float = DEFAULT_HANG_AFTER,
        api_key: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        meta: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.models = models
        self.meta = meta  # llama-server's `meta` of each listed model (model_meta())
        self.model_busy = model_busy
        self.cpu = cpu
        self.max_queue = max_queue
        self.hang_after = hang_after
        self.api_key = api_key
        self.clock = clock
        self.admitted = 0  # requests for the model: running or waiting for it
        self.refused = 0
        self.served = 0
        self.busy_since: float | None = None
        self.sending = 0  # response writes waiting for a client to read
        self.send_since = 0.0
        self._cpu_seen: float | None = None
        self._progress_at = clock()
        self._last_done: float | None = None
        self._gap: float | None = None  # EWMA of the time between two finished requests

    # ------------------------------------------------------------------------------ state
    def observe(self) -> None:
        """Take a CPU reading: progress when the inference threads used time since the last one."""
        now = self.clock()
        cpu = self.cpu()
        if cpu is not None:
            if self._cpu_seen is None or cpu < self._cpu_seen:  # first reading, or a thread ended
                self._cpu_seen = cpu
            elif cpu > self._cpu_seen:
                self._cpu_seen = cpu
                self._progress_at = now
        if not self.admitted:
            self._progress_at = now  # idle is not stuck

    def health(self) -> tuple[int, dict[str, Any]]:
        """(status code, body) of ``GET /health``."""
        self.observe()
        now = self.clock()
        running = 1 if self.model_busy() else 0
        stalled = now - self._progress_at
        body: dict[str, Any] = {
            "status": "ok",
            "models": self.models,
            "running": running,
            "waiting": max(0, self.admitted - running),
            "max_queue": self.max_queue,
            "served": self.served,
            "refused": self.refused,
            "busy_for_s": round(now - self.busy_since, 1) if self.busy_since is not None else 0.0,
            "no_progress_for_s": round(stalled, 1),
        }
        if not self.admitted:
            return 200, body
        body["status"] = "busy"
        if self.sending and now - self.send_since > 1.0:
            body["detail"] = f"waiting {now - self.send_since:.0f} s for a client to read its stream"
            return 200, body
        if running and self.cpu() is not None and stalled > self.hang_after:
            body["status"] = "hung"
            body["detail"] = (
                f"{body['running']} request running, {body['waiting']} waiting, and no inference "
                f"progress (CPU) for {stalled:.0f} s"
            )
            return 503, body
        return 200, body

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely to be free."""
        return max(1, math.ceil(self._gap)) if self._gap is not None else 5

    def _done(self, started: float) -> None:
        now = self.clock()
        # The time since the previous finish if the engine stayed busy since then, else this
        # request's own time: either way, how often a place frees up.
        busy_throughout = (
            self._last_done is not None
            and self.busy_since is not None
            and (self.busy_since <= self._last_done)
        )
        sample = now - self._last_done if busy_throughout and self._last_done is not None else now - started
        self._gap = sample if self._gap is None else 0.7 * self._gap + 0.3 * sample
        self._last_done = now
        self.served += 1

    # ------------------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if method == "GET" and path == "/health":
            status, body = self.health()
            await _json(send, status, body)
            return
        if method == "GET" and path == "/v1/models":
            if not self._authorized(scope):
                await _json(send, 401, {"detail": "Invalid API key"})
                return
            data: list[dict[str, Any]] = [
                {"id": m, "object": "model", "owned_by": "me", "permissions": []} for m in self.models
            ]
            if self.meta:
                for item in data:
                    item["meta"] = self.meta
            await _json(send, 200, {"object": "list", "data": data})
            return
        if method != "POST" or path not in MODEL_PATHS:
            await self.app(scope, receive, send)
            return
        if self.max_queue and self.admitted >= self.max_queue:
            self.refused += 1
            wait = self.retry_after()
            await _json(
                send,
                503,
                {
                    "error": {
                        "message": f"the engine is busy: {self.admitted} requests are running or waiting "
                        f"(the most it queues, --max-queue); retry after {wait} s",
                        "type": "server_error",
                        "code": "engine_queue_full",
                    }
                },
                [(b"retry-after", str(wait).encode())],
            )
            return
        started = self.clock()
        if not self.admitted:
            self.busy_since = started
        self.admitted += 1
        self.observe()
        self._progress_at = started  # a new request is progress

        async def send_tracked(message: Message) -> None:
            if not self.sending:
                self.send_since = self.clock()
            self.sending += 1
            try:
                await send(message)
            finally:
                self.sending -= 1

        record: dict[str, float] | None = None
        last = b""  # the last data event sent, for the usage chunk's id and model

        async def send_usage(message: Message) -> None:
            nonlocal last
            if record is not None and message["type"] == "http.response.body":
                body = message.get("body", b"")
                at = body.find(b"data: [DONE]")
                if at >= 0:
                    message = {**message, "body": body[:at] + usage_event(last, record) + body[at:]}
                elif b"data: {" in body:
                    last = body
            await send_tracked(message)

        token = None
        try:
            if path in GENERATION_PATHS:
                read, raw = await _read_body(receive)
                receive = _replay(read, receive)
                if wants_usage(raw):
                    record = {}
                    token = USAGE.set(record)
            await self.app(scope, receive, send_usage)
        finally:
            if token is not None:
                USAGE.reset(token)
            self.admitted -= 1
            self._done(started)
            if not self.admitted:
                self.busy_since = None

    def _authorized(self, scope: Scope) -> bool:
        if not self.api_key:
            return True
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                return bool(value.decode("latin-1") == f"Bearer {self.api_key}")
        return False


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """``receive`` that gives ``messages`` (already read) first, then the client's next ones."""
    pending = list(messages)

    async def replay() -> Message:
        return pending.pop(0) if pending else await receive()

    return replay


async def _json(send: Send, status: int, body: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    raw = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": raw})


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ours = argparse.ArgumentParser(add_help=False)
    ours.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE)
    ours.add_argument("--hang-after", type=float, default=DEFAULT_HANG_AFTER)
    known, rest = ours.parse_known_args(sys.argv[1:] if argv is None else argv)

    # Imported here: the module's helpers (format_dialogue, Gate) need no llama-cpp-python.
    import starlette_context.plugins.base as ctx_base
    import uvicorn
    from llama_cpp.server import app as server_app
    from llama_cpp.server.cli import add_args_from_model, parse_model_from_args
    from llama_cpp.server.settings import ModelSettings, ServerSettings, Settings

    ctx_base.PluginUUIDBase.validate_uuid = lambda self, uuid_to_validate: None  # type: ignore[method-assign]
    register_chat_formats()

    parser = argparse.ArgumentParser(description="llama_cpp.server with a health check and a bounded queue")
    add_args_from_model(parser, Settings)
    args = parser.parse_args(rest)
    server_settings = cast(ServerSettings, parse_model_from_args(ServerSettings, args))
    model_settings = [cast(ModelSettings, parse_model_from_args(ModelSettings, args))]
    app = server_app.create_app(server_settings=server_settings, model_settings=model_settings)
    proxy = server_app._llama_proxy
    model = proxy._current_model if proxy is not None else None
    lean = model is not None and model.cache is not None and lean_scores(model)
    if model is not None:
        count_tokens(model)
    gate = Gate(
        app,
        models=[m.model_alias or m.model for m in model_settings],
        meta=model_meta(model) if model is not None else None,
        model_busy=server_app.llama_inner_lock.locked,
        cpu=InferenceCpu(threading.get_native_id()),
        max_queue=known.max_queue,
        hang_after=known.hang_after,
        api_key=server_settings.api_key,
    )
    print(
        f"engine_server: queue bound {known.max_queue or 'none'}, hung after {known.hang_after:g} s "
        f"without progress; GET /health{'; prompt cache of KV states only' if lean else ''}",
        flush=True,
    )
    uvicorn.run(gate, host=server_settings.host, port=server_settings.port)


if __name__ == "__main__":
    main()
