"""Ollama's REST API served by the bridge in front of an engine that speaks only OpenAI's API
(a route given as ``NAME=openai+URL``).

- :mod:`bridge.ollama.api`: the translation, with no I/O (JSON in, JSON and bytes out).
- :mod:`bridge.ollama.front`: the asyncio part, hooked into the bridge's forwarding.
"""
