"""Open WebUI behind relay + bridge, driven in Debian's chromium: shared by ``tests/test_webui.py`` and
``screenshots/make.py``.

The stack, all real processes on loopback::

    chromium (Playwright) --> relay --(one WebSocket)--> bridge --> Open WebUI --> engine
                                                                \\-> engine (route ``ollama``)

Open WebUI runs from ``.venv-webui`` (``scripts/setup.d/20-open-webui.sh``) with auth ON: its first
account, made here through its API, is the admin. The browser is pointed only at the relay, and logs in
once, to the relay: Open WebUI signs it in from the relay's ``X-Bridge-User-Email`` (its trusted-header
sign-in, as deployment/webui_setup.py configures it), one account per relay key.

Two engines, both behind Open WebUI (and reachable through the relay as routes ``ollama`` and ``llm``):

* :func:`start_standin_engine`: the stand-in Ollama API of ``tests/upstreams.py`` (STAND-IN: Ollama's
  own binary cannot run here), on Open WebUI's Ollama connection. It streams a known sentence one
  token every ``token_delay`` seconds, so a test can watch the reply grow word by word.
* :func:`start_llama_engine`: the real llama.cpp engine (``deployment/engine.py``,
  ``scripts/setup.d/30-llama-cpp.sh``) on a generated tiny model, on Open WebUI's OpenAI connection.
  It answers as fast as it can (about 490 tokens, up to its small context) with words nobody knows in
  advance.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from bridge.httprules import USER_EMAIL_HEADER, USER_NAME_HEADER
from deployment.engine import (
    GEMMA_CHAT_FORMAT,
    GEMMA_MODEL_ID,
    EmbeddedEngine,
    engine_available,
    gemma_available,
    gemma_model_file,
)

from .procs import API_KEY, ROOT, Bridge, Proc, Relay, bridge_cmd, free_port, start_upstream
from .upstreams import MODEL, REPLY

WEBUI_VENV = ROOT / ".venv-webui"
WEBUI_BIN = WEBUI_VENV / "bin" / "open-webui"
WEBUI_VERSION = "0.12.4"  # keep in step with scripts/setup.d/20-open-webui.sh
CHROMIUM = Path("/usr/bin/chromium")
#: Flags that keep Debian's chromium from hanging on a closed network (shared/notes/open-webui.md).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ADMIN_NAME = "Test Admin"
ADMIN_EMAIL = "admin@example.com"
#: Seconds Open WebUI may take to answer /health on a fresh database (about 25 s alone; CI is busy).
START_TIMEOUT = 150.0


class MissingComponent(AssertionError):
    """A part the webui tests need is not installed: the message names the set-up step to run."""


def require_components(*, llama: bool = False) -> None:
    """Fail (not skip) with the set-up step to run when Open WebUI, chromium or (``llama``) the
    llama.cpp engine is missing."""
    missing = []
    if llama and (why := engine_available()):
        missing.append(why)
    if not list(WEBUI_VENV.glob(f"lib/python3*/site-packages/open_webui-{WEBUI_VERSION}.dist-info")):
        missing.append(
            f"Open WebUI {WEBUI_VERSION} is not installed in {WEBUI_VENV}: "
            "run `bash scripts/setup.d/20-open-webui.sh`"
        )
    if not CHROMIUM.exists():
        missing.append(f"{CHROMIUM} is missing: run `bash scripts/setup.d/10-chromium.sh`")
    if missing:
        raise MissingComponent("; ".join(missing) + " (or `bash scripts/test.sh`, which runs every step)")


# ============================================================================================ engine
@dataclass
class Engine:
    """An LLM engine Open WebUI talks to: ``api`` says which of its connections to use."""

    url: str
    api: Literal["ollama", "openai"]
    model: str
    reply: str  # what it answers, when known in advance (the stand-in's canned sentence), else ""
    stop: Callable[[], None]


def start_standin_engine(token_delay: float) -> Engine:
    """STAND-IN for Ollama (tests/upstreams.py): one known sentence, ``token_delay`` s a token."""
    proc, url = start_upstream(token_delay)
    return Engine(url=url, api="ollama", model=MODEL, reply=REPLY, stop=proc.stop)


#: The llama.cpp engine's model name (distinct from the stand-in's ``tiny:latest`` in the picker).
LLAMA_MODEL = "tiny-llama"
#: Its context: it never ends a reply by itself, so a reply runs to the context's end (~490 tokens).
LLAMA_CONTEXT = 512


def start_llama_engine(workdir: Path | None = None) -> Engine:
    """The real llama.cpp server (OpenAI API) on a tiny generated model; with ``workdir``, on the
    real model the deployment serves by default instead (Gemma 3 270M from PyPI, assembled there, with
    the deployment's chat format: deployment/engines.py)."""
    if workdir is None:
        engine = EmbeddedEngine(model_id=LLAMA_MODEL, n_ctx=LLAMA_CONTEXT, python=sys.executable)
    else:
        why = gemma_available()
        if why:
            raise MissingComponent(why)
        engine = EmbeddedEngine(
            gemma_model_file(workdir / "models"),
            model_id=GEMMA_MODEL_ID,
            n_ctx=2048,
            n_threads=2,
            chat_format=GEMMA_CHAT_FORMAT,
            python=sys.executable,
        )
    url = engine.start()
    return Engine(url=url, api="openai", model=engine.model, reply="", stop=engine.stop)


# ======================================================================================= Open WebUI
def webui_env(data_dir: Path, secret_key: str, engines: list[Engine]) -> dict[str, str]:
    """Environment for an offline Open WebUI with auth on (facts in shared/notes/open-webui.md)."""
    env = {
        "DATA_DIR": str(data_dir),
        "WEBUI_SECRET_KEY": secret_key,
        "WEBUI_AUTH": "true",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "ENABLE_OLLAMA_API": "false",
        "ENABLE_OPENAI_API": "false",
        "RAG_EMBEDDING_ENGINE": "ollama",
        "RAG_EMBEDDING_MODEL_AUTO_UPDATE": "false",
        "ENABLE_TITLE_GENERATION": "false",
        "ENABLE_TAGS_GENERATION": "false",
        "ENABLE_FOLLOW_UP_GENERATION": "false",
        "ENABLE_AUTOCOMPLETE_GENERATION": "false",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "true",
        "SCARF_NO_ANALYTICS": "true",
        "ENABLE_WEBSOCKET_SUPPORT": "true",  # the default, said aloud: tokens reach the browser over WS
        "GLOBAL_LOG_LEVEL": "INFO",
        # The one login, as deployment/webui_setup.py sets it: who the relay says (its key's account,
        # made on its first visit with the role `user`, seeing the models).
        "WEBUI_AUTH_TRUSTED_EMAIL_HEADER": USER_EMAIL_HEADER,
        "WEBUI_AUTH_TRUSTED_NAME_HEADER": USER_NAME_HEADER,
        "DEFAULT_USER_ROLE": "user",
        "BYPASS_MODEL_ACCESS_CONTROL": "true",
    }
    for engine in engines:
        if engine.api == "ollama":
            env.update(ENABLE_OLLAMA_API="true", OLLAMA_BASE_URL=engine.url)
        else:
            env.update(
                ENABLE_OPENAI_API="true", OPENAI_API_BASE_URL=engine.url + "/v1", OPENAI_API_KEY="unused"
            )
    return env


class OpenWebUI:
    """``open-webui serve`` on a free loopback port, its own DATA_DIR and working directory."""

    def __init__(self, workdir: Path, engines: list[Engine], *, secret_key: str | None = None) -> None:
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.started = time.monotonic()
        # `env --chdir`: it writes files into its working directory; keep them out of the repository.
        self.proc = Proc(
            [
                "env",
                f"--chdir={workdir}",
                str(WEBUI_BIN),
                "serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
            "open-webui",
            webui_env(self.data_dir, secret_key or secrets.token_urlsafe(48), engines),
        )
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``/health`` (another process's state: nothing to wait on but the answer)."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while True:
                if self.proc.popen.poll() is not None:
                    raise AssertionError(f"Open WebUI exited ({self.proc.popen.returncode}):\n{self.tail()}")
                try:
                    if client.get(self.url + "/health").status_code == 200:
                        self.startup_s = time.monotonic() - self.started
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise AssertionError(f"Open WebUI not healthy after {timeout:.0f}s:\n{self.tail()}")
                time.sleep(0.25)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.proc.lines[-n:])

    def create_admin(self, email: str, password: str, name: str = ADMIN_NAME) -> dict[str, Any]:
        """Sign up the first account (which Open WebUI makes the admin); its JSON answer."""
        r = httpx.post(
            self.url + "/api/v1/auths/signup",
            json={"name": name, "email": email, "password": password},
            timeout=60,
        )
        if r.status_code != 200:
            raise AssertionError(f"admin signup failed: {r.status_code} {r.text[:500]}")
        data: dict[str, Any] = r.json()
        if data.get("role") != "admin":
            raise AssertionError(f"the first account is not an admin: role {data.get('role')!r}")
        return data

    def stop(self) -> None:
        self.proc.stop()


# ============================================================================================ stack
@dataclass
class WebUIStack:
    engine: Engine  # the stand-in (Ollama connection)
    llama: Engine | None  # the llama.cpp engine (OpenAI connection), when started
    webui: OpenWebUI
    relay: Relay
    bridge: Bridge
    admin_email: str
    admin_password: str
    second_key: str  # a key made with `bridge keys add --label SECOND_LABEL` (API_KEY is the first)
    procs: list[Proc] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The only URL the browser is given."""
        return self.relay.url

    def logs(self) -> dict[str, str]:
        return {p.name: p.output for p in self.procs}


@contextlib.contextmanager
def webui_stack(
    workdir: Path,
    *,
    token_delay: float = 0.25,
    admin_password: str | None = None,
    llama: bool = True,
    gemma: bool = False,
) -> Iterator[WebUIStack]:
    """The engines, Open WebUI (admin account made), relay and bridge with routes ``webui`` (the
    default route, at ``/``), ``ollama`` (the stand-in) and ``llm`` (the llama.cpp engine, with
    ``llama``: on the tiny model, or on Gemma with ``gemma``); everything stopped on exit."""
    require_components(llama=llama)
    password = admin_password or "pw-" + secrets.token_urlsafe(18)
    stops: list[Callable[[], None]] = []
    try:
        standin = start_standin_engine(token_delay)
        stops.append(standin.stop)
        llama_engine = start_llama_engine(workdir if gemma else None) if llama else None
        if llama_engine:
            stops.append(llama_engine.stop)
        engines = [standin] + ([llama_engine] if llama_engine else [])
        webui = OpenWebUI(workdir / "open-webui", engines)
        stops.append(webui.stop)
        second_key = add_key(workdir / "relay", SECOND_LABEL)
        relay = Relay(workdir / "relay", "--default-route", "webui")
        stops.append(relay.proc.stop)
        webui.wait_ready()
        webui.create_admin(ADMIN_EMAIL, password)
        routes = {"webui": webui.url, "ollama": standin.url}
        if llama_engine:
            routes["llm"] = llama_engine.url
        bridge = Bridge(relay, routes)
        stops.append(bridge.proc.stop)
        yield WebUIStack(
            standin,
            llama_engine,
            webui,
            relay,
            bridge,
            ADMIN_EMAIL,
            password,
            second_key,
            [webui.proc, relay.proc, bridge.proc],
        )
    finally:
        for stop in reversed(stops):
            stop()


SECOND_LABEL = "Second Tester"


def add_key(relay_dir: Path, label: str) -> str:
    """A client key made with ``bridge keys add`` in the relay's data directory (before it starts)."""
    out = subprocess.run(
        bridge_cmd("keys", "add", "--data-dir", str(relay_dir), "--label", label),
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


# ========================================================================================== browser
@dataclass
class Traffic:
    """Every request and WebSocket a browser context opened (to prove nothing went around the relay)."""

    requests: list[str] = field(default_factory=list)
    websockets: list[str] = field(default_factory=list)
    ws_frames: list[str] = field(default_factory=list)  # text frames the page received over WebSockets
    sockets: list[Any] = field(default_factory=list)  # Playwright WebSocket objects, in order

    def socketio(self) -> Any:
        """The page's open socket.io WebSocket (the last one opened)."""
        live = [ws for ws in self.sockets if "/ws/socket.io" in ws.url and not ws.is_closed()]
        if not live:
            raise AssertionError(f"no open socket.io WebSocket: {self.websockets}")
        return live[-1]

    def network_urls(self) -> list[str]:
        return [
            u for u in self.requests + self.websockets if urlsplit(u).scheme in ("http", "https", "ws", "wss")
        ]

    def foreign(self, relay_url: str) -> list[str]:
        """URLs that did not go to the relay's host:port."""
        netloc = urlsplit(relay_url).netloc
        return [u for u in self.network_urls() if urlsplit(u).netloc != netloc]


def watch(context: Any, traffic: Traffic) -> None:
    """Record a Playwright BrowserContext's requests, and its pages' WebSockets."""

    def on_ws(ws: Any) -> None:
        traffic.websockets.append(ws.url)
        traffic.sockets.append(ws)

        def on_frame(payload: str | bytes) -> None:
            traffic.ws_frames.append(payload if isinstance(payload, str) else payload.decode("latin-1"))

        ws.on("framereceived", on_frame)

    def on_page(page: Any) -> None:
        page.on("websocket", on_ws)

    context.on("request", lambda req: traffic.requests.append(req.url))
    context.on("page", on_page)


def launch_chromium(playwright: Any) -> Any:
    """Debian's chromium (never a browser Playwright downloads), headless."""
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def relay_login(page: Any, relay_url: str, key: str = API_KEY) -> None:
    """Open the relay's URL: it sends a browser without its cookie to /_relay/login; enter the key."""
    page.goto(relay_url + "/")
    page.wait_for_url("**/_relay/login**")
    page.fill("input[name=key]", key)
    page.click("button[type=submit]")
    page.wait_for_url(lambda url: "/_relay/" not in url)


def webui_signed_in(page: Any, timeout_ms: float = 60_000) -> dict[str, Any]:
    """After the relay's login: Open WebUI opens signed in by itself (its auth page signs in from
    the relay's header, no form to fill); close its "What's New" modal if shown. The account, as
    Open WebUI's API tells the page (``/api/v1/auths/`` with the page's own token)."""
    page.wait_for_selector("#chat-input", timeout=timeout_ms)
    dismiss_whats_new(page)
    return page_account(page)


def page_account(page: Any) -> dict[str, Any]:
    """Who the page is signed in as: Open WebUI's ``/api/v1/auths/`` with the page's token."""
    account: dict[str, Any] = page.evaluate(
        """async () => (await fetch('/api/v1/auths/',
             {headers: {Authorization: 'Bearer ' + localStorage.token}})).json()"""
    )
    return account


def choose_model(page: Any, model: str, timeout_ms: float = 30_000) -> None:
    """Pick ``model`` in the chat's model selector (a listbox of the models Open WebUI found)."""
    page.click("#model-selector-model-button", timeout=timeout_ms)
    page.get_by_role("option", name=re.compile(re.escape(model))).first.click(timeout=timeout_ms)
    page.wait_for_selector(
        f'#model-selector-model-button[aria-label="Selected model: {model}"]', timeout=timeout_ms
    )


def dismiss_whats_new(page: Any) -> bool:
    """Close the "What's New" modal a first visit may show (it blocks clicks); whether it was there."""
    button = page.get_by_role("button", name="Okay, Let's Go!")
    try:
        button.wait_for(timeout=3_000)
    except PlaywrightTimeout:
        return False
    button.click()
    button.wait_for(state="detached", timeout=10_000)
    return True


def open_sidebar(page: Any) -> None:
    page.get_by_role("button", name="Open Sidebar").first.click()


#: Records, on every DOM change, how many words of ``reply`` the page shows (the longest prefix
#: present), with the time: the reply's growth as the user sees it, without polling.
_GROWTH_JS = """
(reply) => {
  const words = reply.split(' ');
  const samples = [];
  window.__replyGrowth = samples;
  let last = -1;
  const measure = () => {
    const text = document.body.innerText.replace(/\\s+/g, ' ');
    let n = 0;
    while (n < words.length && text.includes(words.slice(0, n + 1).join(' '))) n++;
    if (n !== last) { last = n; samples.push([performance.now(), n]); }
  };
  new MutationObserver(measure).observe(document.body, {subtree: true, childList: true, characterData: true});
  measure();
}
"""


def send_message(page: Any, text: str) -> None:
    page.click("#chat-input")
    page.keyboard.type(text)
    page.keyboard.press("Enter")


def watch_reply_growth(page: Any, reply: str) -> None:
    page.evaluate(_GROWTH_JS, reply)


def wait_reply_done(page: Any, reply: str, timeout_ms: float = 60_000) -> list[tuple[float, int]]:
    """Wait until the whole reply is shown; the growth samples ``(ms, words shown)``."""
    words = len(reply.split(" "))
    page.wait_for_function(
        "n => (window.__replyGrowth || []).some(s => s[1] === n)", arg=words, timeout=timeout_ms
    )
    samples: list[list[float]] = page.evaluate("window.__replyGrowth")
    return [(float(t), int(n)) for t, n in samples]


def _socketio_event(frame: str | bytes) -> dict[str, Any] | None:
    """The ``data`` of an Open WebUI ``events`` socket.io message (frame ``42["events", {...}]``:
    Engine.IO message + Socket.IO event), else None."""
    if not isinstance(frame, str) or not frame.startswith("42"):
        return None
    try:
        message = json.loads(frame[2:])
    except ValueError:
        return None
    if not (isinstance(message, list) and len(message) == 2 and message[0] == "events"):
        return None
    event = message[1].get("data") if isinstance(message[1], dict) else None
    return event if isinstance(event, dict) else None


def is_reply_done(frame: str | bytes) -> bool:
    """Whether a socket.io frame is Open WebUI's "this reply is complete" event."""
    event = _socketio_event(frame)
    return bool(
        event
        and event.get("type") == "chat:completion"
        and isinstance(event.get("data"), dict)
        and event["data"].get("done") is True
    )


def send_and_wait_done(page: Any, traffic: Traffic, text: str, timeout_ms: float = 60_000) -> None:
    """Send a chat message and return once Open WebUI's socket.io says the reply is complete."""
    with traffic.socketio().expect_event("framereceived", predicate=is_reply_done, timeout=timeout_ms):
        send_message(page, text)


#: Records the page's text (whitespace collapsed) after every DOM change, with the time.
_SNAPSHOT_JS = r"""
() => {
  const snapshots = [];
  window.__textSnapshots = snapshots;
  let last = null;
  const take = () => {
    const text = document.body.innerText.replace(/\s+/g, ' ');
    if (text !== last) { last = text; snapshots.push([performance.now(), text]); }
  };
  new MutationObserver(take).observe(document.body, {subtree: true, childList: true, characterData: true});
  take();
}
"""


def record_page_text(page: Any) -> None:
    page.evaluate(_SNAPSHOT_JS)


def page_text_snapshots(page: Any) -> list[tuple[float, str]]:
    snapshots: list[list[Any]] = page.evaluate("window.__textSnapshots")
    return [(float(t), str(text)) for t, text in snapshots]


def words_shown(text: str, reply: str) -> int:
    """How many of ``reply``'s first words ``text`` shows (the longest prefix present)."""
    words = reply.split()
    lo, hi = 0, len(words)
    while lo < hi:  # a prefix present means every shorter one is: bisect
        mid = (lo + hi + 1) // 2
        if " ".join(words[:mid]) in text:
            lo = mid
        else:
            hi = mid - 1
    return lo


def socketio_reply_deltas(frames: list[str]) -> list[str]:
    """The reply's text pieces in socket.io frames, in order: Open WebUI 0.12.4 sends each streamed
    piece as an ``events`` message of type ``response:completion`` holding a
    ``response.output_text.delta``."""
    deltas = []
    for frame in frames:
        event = _socketio_event(frame)
        if not event or event.get("type") != "response:completion":
            continue
        data = event.get("data")
        if isinstance(data, dict) and data.get("type") == "response.output_text.delta":
            deltas.append(str(data.get("delta", "")))
    return deltas


def dump(traffic: Traffic) -> str:
    return json.dumps({"requests": traffic.requests, "websockets": traffic.websockets}, indent=1)
