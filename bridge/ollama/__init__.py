"""Ollama's REST API served by the bridge in front of an engine that speaks only OpenAI's API
(a route given as ``NAME=openai+URL``), by responsibility:

==============  ===================================================================================
``api``         the translation in one namespace (its docstring: what was checked in Ollama's source)
``values``      Go's JSON, times, durations and unmarshal errors as Ollama writes and reads them
``models``      the engine's models; the answers of ``/api/tags``, ``/api/ps``, ``/api/show``
``generation``  ``/api/chat`` and ``/api/generate`` as OpenAI requests
``stream``      the engine's server-sent events as Ollama's NDJSON lines and counters
``embedding``   ``/api/embed`` and ``/api/embeddings``
==============  ===================================================================================

All without I/O (JSON in, JSON and bytes out); the asyncio part that drives it on the bridge's
forwarding is :mod:`bridge.node.ollama_front`.
"""
