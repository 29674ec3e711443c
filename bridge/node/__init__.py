"""The bridge, the notebook side, by responsibility:

================  =================================================================================
``bridge``        dial the relay, reconnect, drain; answer its streams; publish measurements (STATS)
``upstream``      a route's upstreams (replicas) and the one forwarding path to them (HTTP, WebSocket)
``downstream``    where a forwarded answer goes (what the tunnel and the local endpoint implement)
``ollama_front``  Ollama's REST API in front of an OpenAI-only engine (translation: bridge/ollama/)
``local``         the local endpoint (``--listen``), on the relay's HTTP rules
``metering``      per-request measurement where the bridge forwards, and the JSONL log
``sampler``       GPU (NVML) and host (psutil) samples
================  =================================================================================
"""
