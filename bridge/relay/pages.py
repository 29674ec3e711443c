"""The relay's two HTML pages: the browser login and the status page. No scripts, no external
assets (the relay answers them with a CSP of ``default-src 'none'``); all values are escaped."""

from __future__ import annotations

import html
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;background:#0f172a;color:#e2e8f0;margin:0}
.center{display:flex;min-height:100vh;align-items:center;justify-content:center}
form,.card{background:#1e293b;padding:2rem 2.5rem;border-radius:12px;box-shadow:0 10px 30px #0008}
form{width:22rem}
h1{font-size:1.3rem;margin:0 0 .3rem} p,.muted{color:#94a3b8;font-size:.9rem}
input{width:100%;box-sizing:border-box;padding:.6rem;border-radius:6px;border:1px solid #475569;
background:#0f172a;color:#e2e8f0;font-family:monospace;line-height:1.4}
button{margin-top:1rem;width:100%;padding:.6rem;border:0;border-radius:6px;background:#6366f1;color:white;
font-size:1rem;cursor:pointer} .err{color:#fca5a5}
main{max-width:72rem;margin:2rem auto;padding:0 1rem}
table{border-collapse:collapse;width:100%;margin-top:1rem}
th,td{text-align:left;padding:.45rem .6rem;border-bottom:1px solid #334155;font-size:.9rem;vertical-align:top;
white-space:nowrap}
th{color:#94a3b8;font-weight:600}
.ok{color:#86efac}.bad{color:#fca5a5}.warn{color:#fcd34d}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(10rem,1fr));gap:.8rem;margin-top:1rem}
.grid div{background:#0f172a;border-radius:8px;padding:.7rem}.grid b{display:block;font-size:1.4rem}
a{color:#a5b4fc;white-space:nowrap}
"""


def _page(title: str, body: str, *, refresh: int | None = None) -> str:
    meta = f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">{meta}
<title>{html.escape(title)}</title>
<style>{_STYLE}</style></head><body>{body}</body></html>"""


def login_page(next_url: str, error: str) -> str:
    err = f'<p class="err">{html.escape(error)}</p>' if error else ""
    return _page(
        "Relay login",
        f"""<div class="center"><form method="post" action="/_relay/login">
<h1>Private LLM relay</h1>
<p>Enter your client key (printed when the relay started, or made with <code>bridge keys add</code>).</p>
{err}
<input type="password" name="key" placeholder="bk_..." autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{html.escape(next_url)}">
<button type="submit">Log in</button>
</form></div>""",
    )


def _gib(value: Any) -> str:
    return f"{value / 2**30:.1f}" if isinstance(value, int | float) else "?"


def _gpus(sample: dict[str, Any]) -> str:
    gpus = sample.get("gpus") or []
    if not gpus:
        return '<span class="muted">no GPU reported</span>'
    parts = []
    for gpu in gpus:
        name = html.escape(str(gpu.get("name", "GPU")))
        used, total = _gib(gpu.get("memory_used_bytes")), _gib(gpu.get("memory_total_bytes"))
        util = gpu.get("utilization_percent")
        util_s = f", {util:.0f}% busy" if isinstance(util, int | float) else ""
        parts.append(f"{html.escape(str(gpu.get('index', '')))}: {name} {used}/{total} GiB{util_s}")
    return "<br>".join(parts)


def status_page(status: dict[str, Any]) -> str:
    """The page at ``/_relay/`` (authenticated): health at a glance and one row per bridge."""
    up = status.get("node_connected")
    state = '<span class="ok">serving</span>' if up else '<span class="bad">no bridge connected</span>'
    if status.get("draining"):
        state = '<span class="warn">relay draining</span>'
    rows = []
    for node in status.get("nodes_detail", []):
        facts = node.get("facts", {})
        listed = node.get("models") or facts.get("models") or []
        models = ", ".join(html.escape(m) for m in listed if isinstance(m, str))
        ends = facts.get("session_ends_at")
        node_state = (
            '<span class="warn">draining</span>' if node.get("draining") else '<span class="ok">up</span>'
        )
        rows.append(
            "<tr>"
            f"<td>{html.escape(str(node.get('node', '')))}<br><span class='muted'>"
            f"since {html.escape(str(node.get('connected_since', '')))}</span></td>"
            f"<td>{node_state}</td>"
            f"<td>{html.escape(', '.join(node.get('routes', [])))}</td>"
            f"<td>{models or '<span class=muted>-</span>'}</td>"
            f"<td>{int(node.get('streams', 0))}</td>"
            f"<td>{_gpus(node.get('sample', {}))}</td>"
            f"<td>{html.escape(str(ends)) if ends else '<span class=muted>-</span>'}</td>"
            "</tr>"
        )
    table = (
        "<table><tr><th>Node</th><th>State</th><th>Routes</th><th>Models</th><th>Streams</th>"
        "<th>GPU memory</th><th>Session ends</th></tr>" + "".join(rows) + "</table>"
        if rows
        else '<p class="muted">No bridge is connected. Requests wait for one, then get 503.</p>'
    )

    def tile(label: str, value: Any) -> str:
        return f"<div><span class='muted'>{label}</span><b>{html.escape(str(value))}</b></div>"

    last = status.get("last_connected_at") or "never"
    version = html.escape(str(status.get("version", "")))
    protocol = html.escape(str(status.get("protocol", "")))
    uptime = html.escape(str(status.get("uptime_s", "")))
    tiles = "".join(
        tile(label, status.get(key, 0))
        for label, key in (
            ("Bridges", "nodes"),
            ("Requests in flight", "requests_in_flight"),
            ("Waiting for a bridge", "requests_waiting"),
            ("WebSockets open", "websockets_open"),
        )
    )
    return _page(
        "Relay status",
        f"""<main><div class="card"><h1>Private LLM relay: {state}</h1>
<p>Version {version}, protocol {protocol}, up {uptime} s. Last bridge connected at {html.escape(str(last))}.
<a href="/_relay/status">JSON</a> · <a href="/_relay/metrics">metrics</a> · <a href="/">Open WebUI</a> ·
<a href="/_relay/logout">log out</a></p>
<div class="grid">{tiles}</div>
{table}</div></main>""",
        refresh=10,
    )
