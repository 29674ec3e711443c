"""The asyncio layer over the sans-I/O core, shared by relay and bridge: ``tunnel`` (one connection
over one WebSocket: the writer, the heartbeat, stream dispatch), ``stream`` (one exchange, with flow
control) and ``websocket`` (a client WebSocket carried by a stream)."""
