"""Turn a notebook that accepts no inbound connection into a private, reachable LLM service.

The bridge (in the notebook) dials OUT to a public relay over one WebSocket; the relay forwards
every client request through it. See README.md for the map, docs/protocol.md for the wire protocol.
"""

__version__ = "0.1.0"
