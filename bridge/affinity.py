"""Conversation affinity: the turns of one chat go to the replica (bridge) or node (relay) that
served its previous turn, where the engine still holds the chat's prompt in its cache.

Chats are multi-turn and every turn resends the whole history, so turn N's prompt starts with turn
N-1's prompt and answer. An engine that served turn N-1 reuses that prefix (llama.cpp's prompt
cache, Ollama's per-slot cache); any other replica computes the whole prompt again (on a T4 a few
thousand tokens of prefill are a second or more before the first token).

Two pure parts, shared by the bridge and the relay:

- :func:`conversation_key`: a key for a request body, derived from what stays the same in every
  turn of one chat: the leading system messages and the first user message (Ollama's
  ``/api/chat``, OpenAI's ``/v1/chat/completions`` and Open WebUI's requests alike), else Open
  WebUI's ``chat_id``, Ollama's ``/api/generate`` ``context`` (its first tokens), or the
  start of a long raw prompt. The model is left out: clients put it before or after the messages
  (the OpenAI SDK after), a long body cut off at the limit may not show it, and the key must not
  change as the history grows. Only a SHA-256 of these is kept, never the text. It reads at most
  :data:`PEEK_LIMIT` bytes of the body and understands a body cut off there (the leading messages
  come first in every client we know of).
- :class:`Affinity`: a bounded LRU map key -> target, and the rule: a known conversation goes back
  to its target unless that is gone or overloaded (more outstanding requests than the least loaded
  candidate plus ``skew``); a new or fallen-back one goes where the load is least.

Checked against the clients' own sources: Ollama's ``api.ChatRequest`` / ``GenerateRequest``
(``messages``, ``system``, ``prompt``, ``context``; ollama/ollama api/types.go), OpenAI's chat
completions (``messages`` with string or list-of-parts ``content``), Open WebUI's
``/api/chat/completions`` form data (the browser sends ``chat_id`` beside ``messages``; Open WebUI
pops it before asking the engine, and a temporary chat's id has a ``temporary:`` prefix but is still
one chat's: open_webui/main.py ``chat_completion`` and utils/chat_id.py, read in .venv-webui).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

#: Bytes of a request body looked at, at most: the leading messages come first.
PEEK_LIMIT = 64 * 1024
#: Conversations remembered (least recently used forgotten first): 24 bytes of key and a reference each.
DEFAULT_ENTRIES = 4096
#: A conversation stays with its target while that has at most this many more outstanding requests
#: than the least loaded candidate; beyond, it falls back to least outstanding.
DEFAULT_SKEW = 2
#: A raw prompt (``/api/generate``, ``/v1/completions``) is keyed by this many leading characters,
#: and only when it is at least this long: a shorter prompt is cheap to compute again anyway.
PROMPT_PREFIX = 1024
#: Leading tokens of Ollama's ``context`` that key a generation continuing an earlier one.
CONTEXT_PREFIX = 64

_decoder = json.JSONDecoder()
_WS = " \t\n\r"


class _Cut(Exception):
    """The body ends (is cut off) before the value being read."""


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    if i >= len(text):
        raise _Cut
    return i


def _value(text: str, i: int) -> tuple[Any, int]:
    try:
        return _decoder.raw_decode(text, i)
    except ValueError as exc:
        raise _Cut from exc


def _members(text: str, lazy: str) -> Iterator[tuple[str, Any, int]]:
    """The top-level object's members in order, (key, value, where the value starts); a value cut
    off by the end of ``text`` ends the iteration with the key and ``_CUT_VALUE``, and so does the
    member named ``lazy``, whose value is left for the caller to read (only as far as it needs)."""
    i = _skip(text, 0)
    if text[i] != "{":
        return
    i += 1
    while True:
        try:
            i = _skip(text, i)
            if text[i] == "}":
                return
            if text[i] == ",":
                i = _skip(text, i + 1)
            key, i = _value(text, i)
            i = _skip(text, i)
            if text[i] != ":" or not isinstance(key, str):
                return
            i = _skip(text, i + 1)
        except _Cut:
            return
        start = i
        if key == lazy:
            yield key, _CUT_VALUE, start
            return
        try:
            value, i = _value(text, i)
        except _Cut:
            yield key, _CUT_VALUE, start
            return
        yield key, value, start


_CUT_VALUE = object()


def _leading_items(text: str, i: int) -> Iterator[Any]:
    """The complete items of the array starting at ``text[i]``, then ``_CUT_VALUE`` for an item
    cut off by the end of ``text`` (when one had begun)."""
    pending = False
    try:
        i = _skip(text, i)
        if text[i] != "[":
            return
        i += 1
        while True:
            i = _skip(text, i)
            if text[i] == "]":
                return
            pending = True
            if text[i] == ",":
                i = _skip(text, i + 1)
            item, i = _value(text, i)
            pending = False
            yield item
    except _Cut:
        if pending:
            yield _CUT_VALUE


def _content(value: Any) -> Any:
    """A message's content as hashed: a string as is, OpenAI's list of parts as its JSON."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def _leading_messages(messages: Iterator[Any]) -> tuple[list[tuple[str, Any]], bool] | None:
    """The system messages before the first user message and that one, and whether any message
    follows them (a later turn); None when the first user message is not there (cut off, or none)."""
    out: list[tuple[str, Any]] = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        role = m.get("role")
        if not isinstance(role, str):
            return None
        out.append((role, _content(m.get("content"))))
        if role == "user":
            return out, next(messages, None) is not None
        if len(out) > 16:
            return None
    return None


def _digest(*parts: Any) -> str:
    raw = json.dumps(parts, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode("utf-8", "surrogatepass")).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Conversation:
    """What :func:`conversation_key` finds: the conversation's ``key`` (a hash), and whether the
    request ``follows`` an earlier turn (its history holds more than the leading messages). A first
    turn has no prefix cached anywhere: it goes where the load is least (and is remembered there),
    so that chats that start alike ("hi") are not all sent to one replica."""

    key: str
    follows: bool


def conversation_key(body: bytes | None, *, limit: int = PEEK_LIMIT) -> Conversation | None:
    """The conversation a JSON request body belongs to; None when it names none (not JSON, no
    messages or prompt, or the first user message does not fit in ``limit`` bytes).

    The key is the same for every turn of one chat: the leading messages (system messages and the
    first user message), else Open WebUI's ``chat_id``; for raw generations, the first
    :data:`CONTEXT_PREFIX` tokens of Ollama's ``context``, else the system text and the first
    :data:`PROMPT_PREFIX` characters of a prompt at least that long (these count as following an
    earlier turn: nothing tells a first one apart)."""
    if not body:
        return None
    text = bytes(body[:limit]).decode("utf-8", "ignore")
    if text.lstrip(_WS)[:1] != "{":
        return None
    seen: dict[str, Any] = {}
    leading: tuple[list[tuple[str, Any]], bool] | None = None
    for key, value, start in _members(text, lazy="messages"):
        if key == "messages":  # read only as far as the first user message and one more
            leading = _leading_messages(_leading_items(text, start))
        elif value is not _CUT_VALUE and key in ("chat_id", "system", "prompt", "context"):
            seen[key] = value
        if value is _CUT_VALUE:
            break
    if leading is not None:
        return Conversation(_digest("chat", leading[0]), leading[1])
    chat_id = seen.get("chat_id")
    if isinstance(chat_id, str) and chat_id:
        return Conversation(_digest("chat_id", chat_id), True)
    system = seen.get("system")
    system = system if isinstance(system, str) else ""
    context = seen.get("context")
    if isinstance(context, list) and context:
        return Conversation(_digest("context", context[:CONTEXT_PREFIX]), True)
    prompt = seen.get("prompt")
    if isinstance(prompt, str) and len(prompt) >= PROMPT_PREFIX:
        return Conversation(_digest("prompt", system, prompt[:PROMPT_PREFIX]), True)
    return None


T = TypeVar("T", bound=Hashable)


class Affinity(Generic[T]):
    """Which target served each conversation last: a bounded LRU map, and :meth:`choose`.

    ``entries``: conversations remembered; ``skew``: how many more outstanding requests than the
    least loaded candidate a conversation's target may have before the conversation falls back."""

    def __init__(self, entries: int = DEFAULT_ENTRIES, skew: int = DEFAULT_SKEW) -> None:
        self.entries = max(1, entries)
        self.skew = skew
        self._targets: OrderedDict[str, T] = OrderedDict()
        self.new = 0  # a first turn
        self.hits = 0  # a later turn went back to its conversation's target
        self.misses = 0  # a later turn of a conversation not known (or forgotten)
        self.fallbacks = 0  # a known conversation's target was gone or overloaded

    def __len__(self) -> int:
        return len(self._targets)

    def counts(self) -> dict[str, int]:
        """How requests of a conversation were placed so far, by outcome (Prometheus labels):
        ``new`` a first turn, ``kept`` its target again, ``unknown`` a conversation not remembered
        (or forgotten with its target), ``fallback`` its target overloaded or not a candidate."""
        return {"new": self.new, "kept": self.hits, "unknown": self.misses, "fallback": self.fallbacks}

    def target(self, key: str) -> T | None:
        return self._targets.get(key)

    def keep(
        self, conversation: Conversation | None, candidates: Sequence[T], load: Callable[[T], int]
    ) -> T | None:
        """The conversation's target when the request follows an earlier turn and the target is
        among ``candidates`` and not overloaded (at most ``skew`` more outstanding requests than the
        least loaded candidate); else None: the request goes where the load is least (a first turn,
        a conversation not known, or a fallback)."""
        if conversation is None or not candidates:
            return None
        key = conversation.key
        if not conversation.follows:
            self.new += 1
            return None
        target = self._targets.get(key)
        if target is None:
            self.misses += 1
            return None
        if target not in candidates or load(target) > min(load(c) for c in candidates) + self.skew:
            self.fallbacks += 1
            return None
        self.hits += 1
        self._targets.move_to_end(key)
        return target

    def choose(
        self, conversation: Conversation | None, candidates: Sequence[T], load: Callable[[T], int]
    ) -> list[T]:
        """``candidates`` (in the caller's order of preference: least loaded first) with the
        conversation's target moved to the front when :meth:`keep` keeps it."""
        target = self.keep(conversation, candidates, load)
        if target is None:
            return list(candidates)
        return [target, *(c for c in candidates if c != target)]

    def served(self, conversation: Conversation | None, target: T) -> None:
        """Remember that ``target`` took the conversation's latest turn."""
        if conversation is None:
            return
        self._targets[conversation.key] = target
        self._targets.move_to_end(conversation.key)
        while len(self._targets) > self.entries:
            self._targets.popitem(last=False)

    def forget(self, target: T) -> None:
        """A target went away: its conversations go elsewhere (and are forgotten)."""
        for key in [k for k, t in self._targets.items() if t == target]:
            del self._targets[key]
