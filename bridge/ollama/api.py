"""Ollama's REST API on top of an engine that speaks only OpenAI's: the translation, without I/O.

The translation is in :mod:`.values` (Go's JSON, times, durations and errors), :mod:`.models` (the
engine's models and the listing answers), :mod:`.generation` (chat and generate requests),
:mod:`.stream` (the engine's events to Ollama's lines) and :mod:`.embedding`; this module gives all
their names in one namespace (``api.chat_request``, ``api.StreamTranslator``, ...).

Requests come in as parsed JSON, go out as an OpenAI request body (``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``); the engine's server-sent events come in as bytes and go out
as Ollama's NDJSON lines (or one JSON answer for ``"stream": false``). The asyncio part that drives
this is :mod:`bridge.node.ollama_front`. A refused request raises :class:`~bridge.errors.RequestRefused`
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
  ``prompt_eval_count`` only when the engine reports it (the embedded engine's server adds the
  usage chunk and ``timings`` that llama-cpp-python's own server lacks: deployment/engine_server.py;
  an engine that ignores ``stream_options`` gets no ``prompt_eval_count``).
"""

from __future__ import annotations

from .embedding import Embedding as Embedding
from .embedding import embed_answer as embed_answer
from .embedding import embed_request as embed_request
from .embedding import embeddings_request as embeddings_request
from .embedding import empty_embed_answer as empty_embed_answer
from .generation import LOAD_TIME_OPTIONS as LOAD_TIME_OPTIONS
from .generation import OPTION_FIELDS as OPTION_FIELDS
from .generation import OPTION_KINDS as OPTION_KINDS
from .generation import Generation as Generation
from .generation import chat_request as chat_request
from .generation import check_think as check_think
from .generation import generate_request as generate_request
from .generation import immediate_answer as immediate_answer
from .generation import map_options as map_options
from .generation import response_format as response_format
from .models import EngineModel as EngineModel
from .models import engine_models as engine_models
from .models import find_model as find_model
from .models import ollama_name as ollama_name
from .models import ps_answer as ps_answer
from .models import show_answer as show_answer
from .models import tags_answer as tags_answer
from .models import version_answer as version_answer
from .stream import StreamTranslator as StreamTranslator
from .stream import engine_error as engine_error
from .stream import failure_line as failure_line
from .values import FOREVER_NS as FOREVER_NS
from .values import JSON_TYPE as JSON_TYPE
from .values import MAX_EVENT as MAX_EVENT
from .values import NDJSON as NDJSON
from .values import OLLAMA_VERSION as OLLAMA_VERSION
from .values import SERVED_BY as SERVED_BY
from .values import dump as dump
from .values import human_number as human_number
from .values import parse_body as parse_body
from .values import parse_keep_alive as parse_keep_alive
from .values import rfc3339 as rfc3339
