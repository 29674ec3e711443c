"""The relay, the public side, by responsibility:

==============  ===================================================================================
``app``         the ASGI application: wires the rooms together and dispatches each call
``server``      uvicorn with a bounded request head, the drain on SIGTERM, ``serve()``
``sessions``    bridges connecting on ``/_relay/connect``: handshake, frames, heartbeat watchdog
``pool``        the connected nodes and which one a request goes to (a pure ``pick()``)
``forward``     the one forwarding path (acquire, check the route, OPEN, body, head, retry once)
``proxy``       a client's HTTP request through it; the response streamed back
``shared``      one generation for repeated requests (``Idempotency-Key``, deterministic bodies)
``jobs``        the asynchronous job API under ``/_relay/jobs``
``websocket``   client WebSockets carried as streams
``auth``        client keys, node tokens, login cookies; the decision for one request
``endpoints``   ``/_relay/*``: health, status, metrics, login, logout
``pages``       the login and status pages (HTML)
``metrics``     the relay's Prometheus series
``store``       the SQLite state under ``--data-dir``
==============  ===================================================================================
"""
