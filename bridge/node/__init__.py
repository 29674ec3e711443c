"""The bridge, the notebook side, by responsibility:

============  =====================================================================================
``bridge``    dial the relay, reconnect, drain; answer its streams; publish measurements (STATS)
``upstream``  a route's upstreams (replicas) and the one forwarding path to them (HTTP, WebSocket)
``local``     the local endpoint (``--listen``), on the relay's HTTP rules
``metering``  per-request measurement where the bridge forwards, and the JSONL log
``sampler``   GPU (NVML) and host (psutil) samples
============  =====================================================================================
"""
